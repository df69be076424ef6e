"""Manifest merges are idempotent, versioned and never lose an expert."""

from __future__ import annotations

import pytest

from elmcore.errors import BadInputError, NotFoundError
from elmcore.manifest import Manifest, merge_result, remove_expert
from elmcore.records import Parent, Result


def result(domain: str, version: int, sha: str = "a") -> Result:
    return Result(
        run_id=f"branch.{domain}.v{version}",
        kind="expert",
        path=f"experts/{domain}/v{version}",
        sha256=sha * 64,
        domain=domain,
        version=version,
        init_strategy="posterior",
        parents=[Parent(kind="seed", weight=1.0)],
    )


def test_merge_twice_changes_nothing() -> None:
    once = merge_result(Manifest(), result("code", 1))
    assert once.revision == 1
    assert merge_result(once, result("code", 1)) is once


def test_newer_version_replaces_and_older_never_does() -> None:
    v2 = merge_result(merge_result(Manifest(), result("code", 1)), result("code", 2, "b"))
    assert v2.expert("code").version == 2
    assert merge_result(v2, result("code", 1)) is v2


def test_same_version_with_other_bytes_is_refused() -> None:
    manifest = merge_result(Manifest(), result("code", 1))
    with pytest.raises(BadInputError, match="other bytes"):
        merge_result(manifest, result("code", 1, "c"))


def test_remove_is_idempotent_and_version_aware() -> None:
    manifest = merge_result(merge_result(Manifest(), result("code", 1)), result("law", 1))
    assert remove_expert(manifest, "code", version=7) is manifest
    removed = remove_expert(manifest, "code")
    assert sorted(removed.experts) == ["law"]
    assert remove_expert(removed, "code") is removed
    with pytest.raises(NotFoundError, match="experts: law"):
        removed.expert("code")


def test_seed_and_tokenizer_are_frozen_once_experts_exist() -> None:
    seed = Result(run_id="seed", kind="seed", path="seed", sha256="d" * 64)
    manifest = merge_result(merge_result(Manifest(), seed), result("code", 1))
    with pytest.raises(BadInputError, match="seed cannot change"):
        merge_result(manifest, seed.model_copy(update={"sha256": "e" * 64}))
