"""32 branches whose runs finish at the same moment, while S3 fails the operator's merges now and
then (5xx, throttling, 412 races, a read that times out): 32 experts merged, none lost, none
twice, and every fault was met."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from elmcore import layout
from elmcore.records import Result
from elmcore.storage.manifest_store import load_manifest
from tests.harness.s3proxy import S3Fault
from tests.operator.conftest import branch_body
from tests.reliability.conftest import StandinForest

pytestmark = pytest.mark.slow
BRANCHES = 32
# Only the operator talks to S3 through the proxy: these are faults on its own reads and writes.
MERGE_FAULTS = [
    S3Fault("PUT", r"manifest\.json$", 500, times=3),
    S3Fault("PUT", r"manifest\.json$", 503, times=3, code="SlowDown"),
    S3Fault("PUT", r"manifest\.json$", 412, times=3, code="PreconditionFailed"),  # lost a race
    S3Fault("GET", r"manifest\.json$", 0, times=1, stall_seconds=4.0),  # > read timeout (2 s)
    S3Fault("GET", r"result\.json$", 503, times=2, code="SlowDown"),
]


def test_32_branches_finishing_together(standin: StandinForest, tmp_path: Path) -> None:
    cluster, storage = standin.cluster, standin.storage
    assert cluster.kubelet is not None
    cluster.start_operator()
    forest = standin.forest("bulk", maxConcurrentBranches=BRANCHES)
    forest["spec"]["branchDefaults"] = {"steps": 4}
    cluster.create(forest)
    domains = [f"d{i:02d}" for i in range(BRANCHES)]
    for domain in domains:
        cluster.create(branch_body(f"bulk-{domain}", "bulk", domain, f"s3://{standin.bucket}"))

    # Every run trains, then waits at the gate until all 32 are there.
    def all_waiting() -> bool:
        runs = [storage.read_versioned(layout.run_progress(f"branch.{d}.v1")) for d in domains]
        return all(r is not None and b'"training"' in r[0] for r in runs)

    cluster.wait_for("32 runs training", all_waiting, timeout=240)
    standin.proxy.faults.extend(MERGE_FAULTS)
    (tmp_path / "release").touch()  # all 32 commit their results at once
    released = time.monotonic()

    def merged() -> int:
        items = cluster.list("ElmBranch")
        return sum((b.get("status") or {}).get("phase") == "Merged" for b in items)

    cluster.wait_for("32 merged branches", lambda: merged() == BRANCHES, timeout=240)
    seconds = time.monotonic() - released
    manifest = load_manifest(storage)[0]
    assert sorted(manifest.experts) == domains
    # tokenizer + seed + one revision per expert: a lost or repeated merge would show here.
    assert manifest.revision == 2 + BRANCHES
    for domain, entry in manifest.experts.items():
        result = Result.model_validate_json(
            storage.read_bytes(layout.run_result(f"branch.{domain}.v1"))
        )
        assert (entry.version, entry.path, entry.sha256) == (1, result.path, result.sha256)
    assert cluster.emulator is not None
    jobs = {name: n for (plural, name), n in cluster.emulator.created.items() if plural == "jobs"}
    # Each created once: tokenizer, the seed's prepare and training, each branch's prepare and
    # training.
    assert all(n == 1 for n in jobs.values()) and len(jobs) == 3 + 2 * BRANCHES
    cluster.wait_for(
        "the forest to count 32 experts",
        lambda: cluster.get("ElmForest", "bulk")["status"].get("expertCount") == BRANCHES,
    )
    assert [f for f in MERGE_FAULTS if f.hits < f.times] == []
    conflicts = cluster.operator_log().count('"manifest.conflict"')
    print(f"32 merges in {seconds:.1f} s after the release, {conflicts} manifest CAS retries")
