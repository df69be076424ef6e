"""Hostile specs (property-based): the planner never crashes, no key leaves the forest's prefix,
and every rejection is a clear, field-naming condition.

Names and URIs are drawn to escape the storage prefix: ``..``, ``/``, ``%2e``, unicode,
control characters and very long strings, mixed into otherwise valid specs. In the suite the
examples are derandomized (the same every run); ``ELMFOREST_FUZZ_SCALE=20`` (``make reliability``)
draws twenty times as many, at random.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from elmcore import layout
from elmcore.errors import BadInputError
from elmcore.names import branch_run_id
from elmcore.uris import StorageURI
from elmforest.api.branch import ElmBranchSpec, ElmBranchStatus
from elmforest.api.forest import ElmForestSpec, ElmForestStatus
from elmforest.observe.branch import validation_message
from elmforest.planner.actions import CreateJob, PatchStatus
from elmforest.planner.branch import BranchInput, ForestView, plan_branch
from elmforest.planner.forest import ForestInput, plan_forest
from elmforest.planner.observed import StorageView

ESCAPES = ["..", "../..", "%2e%2e", "a/../../b", "/etc/passwd", ".", "", "a//b", "ｃｏｄｅ"]
hostile_text = st.one_of(
    st.sampled_from(ESCAPES),
    st.text(min_size=0, max_size=80),  # unicode and control characters included
    st.text(alphabet="abc-./%2e", min_size=1, max_size=40),
    st.integers(min_value=60, max_value=5000).map(lambda n: "a" * n),
)
label_like = st.one_of(hostile_text, st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?\Z"))
IMAGE = "r.example/t@sha256:" + "c" * 64
FOREST = ElmForestSpec.model_validate(
    {"storage": {"uri": "s3://bucket/forests/f"}, "trainer": {"image": IMAGE}}
)

SCALE = int(os.environ.get("ELMFOREST_FUZZ_SCALE", "1"))
DERANDOMIZE = SCALE == 1  # a seeded, bounded run in CI; the full sweep explores


def keys_of(domain: str, version: int) -> list[str]:
    run_id = branch_run_id(domain, version)
    return [
        layout.expert(domain, version),
        layout.run_result(run_id),
        layout.run_progress(run_id),
        layout.run_checkpoint(run_id, 7),
    ]


def assert_inside(root: StorageURI, keys: list[str]) -> None:
    for key in keys:
        joined = root.join(key)
        assert joined.relative_to(root) == key  # below the prefix, and nowhere else


@settings(
    max_examples=300 * SCALE,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    name=label_like,
    domain=label_like,
    data=st.lists(hostile_text, min_size=0, max_size=3),
    copy_from=st.one_of(st.none(), label_like),
    top_k=st.one_of(st.none(), st.integers(-3, 2000)),
)
def test_branch_specs(
    name: str, domain: str, data: list[str], copy_from: str | None, top_k: int | None
) -> None:
    raw: dict[str, Any] = {
        "forest": "f",
        "domain": domain,
        "data": {"train": data},
        "init": {"strategy": "copy" if copy_from else "posterior", "copyFrom": copy_from},
    }
    if top_k is not None:
        raw["init"]["topK"] = top_k
    try:
        spec = ElmBranchSpec.model_validate(raw)
    except ValidationError as error:
        message = validation_message(error, "spec")
        assert message.startswith("spec.") and len(message) < 2000  # names the field
        return
    plan = plan_branch(
        BranchInput(
            name=name[:63],
            namespace="ns",
            uid="u",
            generation=1,
            spec=spec,
            status=ElmBranchStatus(),
            forest=ForestView("f", FOREST, ready=True),
            domain_owner=None,
        )
    )
    statuses = [a.status for a in plan.actions if isinstance(a, PatchStatus)]
    assert statuses and statuses[-1]["phase"] == "Initializing"  # version 1 starts at once
    [job] = [a.body for a in plan.actions if isinstance(a, CreateJob)]
    assert len(job["metadata"]["name"]) <= 63 and job["metadata"]["namespace"] == "ns"
    assert_inside(StorageURI.parse(FOREST.storage.uri), keys_of(spec.domain, 1))


@settings(max_examples=200 * SCALE, deadline=None, derandomize=DERANDOMIZE)
@given(uri=st.one_of(hostile_text, hostile_text.map(lambda t: f"s3://bucket/{t}")))
def test_forest_storage_uris(uri: str) -> None:
    try:
        spec = ElmForestSpec.model_validate({"storage": {"uri": uri}, "seed": {"data": ["x"]}})
    except ValidationError as error:
        assert validation_message(error, "spec").startswith("spec.storage")
        return
    root = StorageURI.parse(spec.storage.uri)  # the model accepted it, so it parses
    assert ".." not in root.prefix.split("/")
    assert_inside(root, [layout.MANIFEST, layout.TOKENIZER, layout.SEED, *keys_of("code", 3)])
    plan = plan_forest(
        ForestInput(
            name="f",
            namespace="ns",
            uid="u",
            generation=1,
            spec=spec,
            status=ElmForestStatus(),
            storage=StorageView(error="unreachable in this test"),
            require_image=False,
        )
    )
    phases = [a.status["phase"] for a in plan.actions if isinstance(a, PatchStatus)]
    assert phases == ["Failed"]  # storage unreadable: a clear condition, no crash


@settings(max_examples=300 * SCALE, deadline=None, derandomize=DERANDOMIZE)
@given(domain=hostile_text, version=st.integers(-5, 10**12))
def test_keys_refuse_anything_that_is_not_a_name(domain: str, version: int) -> None:
    try:
        keys = keys_of(domain, version)
    except BadInputError:
        return  # refused with a message, before any key exists
    assert_inside(StorageURI.parse("s3://bucket/p"), keys)
