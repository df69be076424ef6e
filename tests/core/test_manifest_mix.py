"""The forest's mix (spec.mix) is recorded in the manifest exactly once, and a newer mix
replaces the current one only once it is committed (merged); a late older one never does."""

from __future__ import annotations

import pytest

from elmcore import layout
from elmcore.errors import BadInputError
from elmcore.manifest import Manifest, merge_result
from elmcore.names import RunId, mix_run_id
from elmcore.records import MixRecord, Parent, Result


def mix_result(number: int, key: str, sha: str = "a") -> Result:
    return Result(
        run_id=mix_run_id(number, key),
        kind="mix",
        path=layout.mix_model(number, key),
        sha256=sha * 64,
        parents=[
            Parent(kind="expert", domain="code", version=1, weight=0.5),
            Parent(kind="expert", domain="law", version=2, weight=0.5),
        ],
        mix=MixRecord(number=number, key=key, top_k=2, steps=3),
    )


def test_mix_is_recorded_once() -> None:
    once = merge_result(Manifest(), mix_result(1, "1" * 32))
    assert once.revision == 1
    assert once.mix is not None and once.mix.experts() == {"code": 1, "law": 2}
    assert once.mix.path == f"moe/v1-{'1' * 16}/model"
    assert merge_result(once, mix_result(1, "1" * 32)) is once


def test_newer_mix_replaces_and_a_late_older_one_never_does() -> None:
    first = merge_result(Manifest(), mix_result(1, "1" * 32))
    second = merge_result(first, mix_result(2, "2" * 32, "b"))
    assert second.mix is not None and second.mix.mix.number == 2
    assert merge_result(second, mix_result(1, "1" * 32)) is second


def test_same_number_with_other_bytes_is_refused() -> None:
    manifest = merge_result(Manifest(), mix_result(1, "1" * 32))
    with pytest.raises(BadInputError, match="other bytes"):
        merge_result(manifest, mix_result(1, "1" * 32, "c"))


def test_a_mix_result_without_its_record_is_bad_input() -> None:
    bare = mix_result(1, "1" * 32).model_copy(update={"mix": None})
    with pytest.raises(BadInputError, match="mix record"):
        merge_result(Manifest(), bare)


def test_mix_runs_are_not_branch_runs() -> None:
    assert mix_run_id(3, "a" * 32) == f"mix.v3.{'a' * 16}"
    assert RunId.parse(mix_run_id(3, "a" * 32)) is None
    with pytest.raises(BadInputError, match="hex"):
        layout.mix(1, "not-hex")
