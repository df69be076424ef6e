"""The ElmForest status summarises each expert's lineage from its manifest entry."""

from __future__ import annotations

from elmcore.manifest import ExpertEntry, Manifest
from elmcore.records import Lineage, SourceFile, files_digest
from elmforest.planner.forest import experts_status
from tests.planner.test_branch_planner import FOREST

FILES = [
    SourceFile(
        location="s3://corpus/cooking/", key=f"part-{i}.txt", size=1000 + i, sha256=f"{i}" * 64
    )
    for i in range(3)
]


def test_the_status_carries_a_digest_of_the_data_and_where_it_came_from() -> None:
    lineage = Lineage(
        data=FILES,
        tokenizer_sha256="a" * 64,
        seed_sha256="b" * 64,
        image="registry.example/elmtrain@sha256:" + "c" * 64,
        elmtrain_version="0.1.0",
    )
    entry = ExpertEntry(path="experts/cooking/v1", sha256="d" * 64, domain="cooking", version=1)
    manifest = Manifest(experts={"cooking": entry.model_copy(update={"lineage": lineage})})
    (status,) = experts_status(FOREST, manifest, {"cooking": "cook"})
    assert status.lineage is not None
    assert status.lineage.data_sha256 == files_digest(FILES)
    assert (status.lineage.data_files, status.lineage.data_bytes) == (3, 3003)
    assert status.lineage.image == lineage.image
    api = status.to_api()["lineage"]  # camelCase, as the CRD's schema has it
    assert api["dataSha256"] == files_digest(FILES) and api["seedSha256"] == "b" * 64

    old = Manifest(experts={"cooking": entry})  # merged before lineage was recorded
    assert experts_status(FOREST, old, {})[0].lineage is None
