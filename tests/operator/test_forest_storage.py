"""What the operator reads from a forest's storage for planning (no API server involved)."""

from __future__ import annotations

from pathlib import Path

from elmforest.adapters.forest_storage import ForestStorage
from elmforest.api.forest import StorageSpec


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
