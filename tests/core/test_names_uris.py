"""Names and storage keys: nothing user-supplied escapes the forest prefix."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elmcore import layout
from elmcore.errors import BadInputError
from elmcore.names import RunId, branch_run_id, validate_label
from elmcore.uris import StorageURI

HOSTILE = ["..", "../x", "a/b", "%2e%2e", "A", "-a", "a-", "é", "a\x00", "a" * 64, "", " a", "a."]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_domain_names_are_rejected(name: str) -> None:
    with pytest.raises(BadInputError):
        layout.expert(name, 1)


def test_valid_names_build_the_documented_layout() -> None:
    assert layout.expert("code", 3) == "experts/code/v3"
    assert layout.run_checkpoint(branch_run_id("code", 3), 42) == (
        "runs/branch.code.v3/checkpoints/step-00000042"
    )
    assert validate_label("a" * 63) == "a" * 63


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://bucket/forests/one", "s3://bucket/forests/one"),
        ("s3://bucket", "s3://bucket"),
        ("file:///tmp/forest", "file:///tmp/forest"),
        ("/tmp/forest/", "file:///tmp/forest"),
    ],
)
def test_uri_round_trip(text: str, expected: str) -> None:
    assert str(StorageURI.parse(text)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "s3://bucket/a/../b",
        "s3://Bad_Bucket/x",
        "gs://b/x",
        "file://host/x",
        "s3://b/%2e%2e/x",
        "file:///tmp/../etc",
        "s3://bucket/a?x=1",
        "s3://bucket/a\n",
    ],
)
def test_bad_uris_are_rejected(text: str) -> None:
    with pytest.raises(BadInputError):
        StorageURI.parse(text)


@given(st.text(max_size=80))
def test_join_never_leaves_the_prefix(key: str) -> None:
    root = StorageURI.parse("s3://bucket/forest")
    try:
        joined = root.join(key)
    except BadInputError:
        return
    assert joined.relative_to(root) == key.strip("/")
    assert ".." not in joined.prefix.split("/")


_LABELS = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)


@given(domain=_LABELS, version=st.integers(min_value=1, max_value=10**6))
def test_run_ids_format_and_parse_back(domain: str, version: int) -> None:
    for run in (RunId.branch(domain, version), RunId.prepare(domain, version)):
        assert RunId.parse(str(run)) == run
        assert any(str(run).startswith(p) for p in RunId.domain_prefixes(domain))
    assert str(RunId.branch(domain, version)) == branch_run_id(domain, version)


def test_run_ids_of_the_forest_and_of_nothing() -> None:
    for run, text in [
        (RunId.tokenizer(), "tokenizer"),
        (RunId.seed(), "seed"),
        (RunId.seed_prepare(), "prepare.seed"),
        (RunId.prepare("seed", 2), "prepare.seed.v2"),  # a domain named "seed" is no clash
    ]:
        assert str(run) == text
        assert RunId.parse(text) == run
    for foreign in [
        "branch.code",
        "branch.code.v0",
        "branch.code.v01",
        "branch..v1",
        "x.code.v1",
        "branch.Code.v1",
        "checkpoints",
        "branch.code.v1.extra",
        "prepare",
    ]:
        assert RunId.parse(foreign) is None
    assert RunId.domain_prefixes("code") == ("branch.code.", "prepare.code.")
    with pytest.raises(BadInputError):
        RunId.branch("../x", 1)
    with pytest.raises(BadInputError):
        RunId.prepare("code", 0)
