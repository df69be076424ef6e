"""What the operator reads from a forest's storage for planning (no API server involved)."""

from __future__ import annotations

from pathlib import Path

from elmcore import layout
from elmcore.names import mix_run_id
from elmcore.records import MixRecord, Result
from elmcore.storage.commit import commit_dir, read_marker
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.api.forest import StorageSpec
from elmforest.planner.actions import MergeResult


def test_a_new_branch_sees_the_highest_version_its_domain_left_in_storage(tmp_path: Path) -> None:
    storage = ForestStorage(StorageSpec(uri=f"file://{tmp_path}"))
    records, merged = storage.observe_branch("quotes", None, used=storage.used_versions())
    assert (records.used_version, merged) == (0, None)
    for key in (
        "runs/branch.quotes.v2/progress.json",  # a run kept by retention Keep (no result)
        "experts/quotes/v3/model.safetensors",  # an expert kept, out of the manifest
        "runs/branch.quotes-old.v9/progress.json",  # another domain's
        "runs/seed/progress.json",
    ):
        storage.storage.write_bytes(key, b"{}")
    used = storage.used_versions()
    assert used == {"quotes": 3, "quotes-old": 9}
    records, _ = storage.observe_branch("quotes", None, used=used)
    assert records.used_version == 3
    # A branch with a version reads that version's records only.
    assert storage.observe_branch("quotes", 3)[0].used_version == 0


def test_recording_a_mix_deletes_the_older_mixes_folders(tmp_path: Path) -> None:
    storage = ForestStorage(StorageSpec(uri=f"file://{tmp_path}"))
    keys = {n: layout.mix_model(n, f"{n}" * 32) for n in (1, 2)}
    folder = tmp_path.parent / f"{tmp_path.name}-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    for key in keys.values():
        commit_dir(storage.storage, folder, key)
    storage.storage.write_bytes(f"{layout.mix_untrained(1, '1' * 32)}/x", b"untrained")
    storage.storage.write_bytes(layout.run_result(mix_run_id(1, "1" * 32)), b"{}")

    def result(n: int) -> Result:
        found = read_marker(storage.storage, keys[n])
        assert found is not None
        return Result(
            run_id=mix_run_id(n, f"{n}" * 32), kind="mix", path=keys[n], sha256=found[1],
            mix=MixRecord(number=n, key=f"{n}" * 32, top_k=1),
        )  # fmt: skip

    storage.apply(MergeResult(result(1)))
    assert storage.storage.list_children(layout.MOE) == ["v1-" + "1" * 16, "v2-" + "2" * 16]
    line = storage.apply(MergeResult(result(2)))
    assert "deleted 3 older mix objects" in line
    assert storage.storage.list_children(layout.MOE) == ["v2-" + "2" * 16]
    assert storage.storage.list_keys("runs")  # its run records stay (small; the lineage)
    # The same result again (a repeated action): recorded once, mix 2's folder stays.
    storage.apply(MergeResult(result(2)))
    assert storage.storage.list_children(layout.MOE) == ["v2-" + "2" * 16]
