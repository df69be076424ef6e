"""The operator under watch streams that keep ending: it reconnects, and stays responsive."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from tests.operator.conftest import branch_body
from tests.reliability.conftest import StandinForest

pytestmark = pytest.mark.slow
BRANCHES = int(os.environ.get("ELMFOREST_SOAK_BRANCHES", "8"))  # one every 2 s


def test_watch_streams_that_keep_disconnecting(standin: StandinForest) -> None:
    cluster = standin.cluster
    assert cluster.emulator is not None and cluster.kubelet is not None
    (standin.cluster.workdir / "release").touch()  # no gate: runs finish as they go
    # Every watch stream (forests, branches, Jobs) ends after 0.3 to 2 seconds.
    cluster.emulator.watch_lifetime = (0.3, 2.0)
    operator = psutil.Process(cluster.start_operator().pid)
    cluster.create(standin.forest("bulk", maxConcurrentBranches=BRANCHES))
    cluster.wait_for(
        "the forest to be ready",
        lambda: (cluster.get("ElmForest", "bulk").get("status") or {}).get("phase") == "Ready",
        timeout=120,
    )
    rss_ready = operator.memory_info().rss
    watches_ready = cluster.emulator.watches

    # A new branch every 2 seconds; each must get its Job soon, whatever the streams do.
    latencies = []
    for i in range(BRANCHES):
        name = f"bulk-d{i}"
        created = time.monotonic()
        cluster.create(branch_body(name, "bulk", f"d{i}", f"s3://{standin.bucket}"))
        cluster.wait_for(
            f"a Job for {name}",
            lambda name=name: f"{name}-v1-a1" in cluster.kubelet.started,  # type: ignore[union-attr]
            timeout=30,
            every=0.05,
        )
        latencies.append(time.monotonic() - created)
        time.sleep(max(0.0, 2.0 - latencies[-1]))

    def all_merged() -> bool:
        phases = [(b.get("status") or {}).get("phase") for b in cluster.list("ElmBranch")]
        return phases == ["Merged"] * BRANCHES

    cluster.wait_for("every branch merged", all_merged, timeout=120)
    reconnects = cluster.emulator.watches - watches_ready
    growth_mb = (operator.memory_info().rss - rss_ready) / 2**20
    print(
        f"watch streams reopened {reconnects}x; Job latency max {max(latencies):.2f} s,"
        f" median {sorted(latencies)[BRANCHES // 2]:.2f} s; RSS growth {growth_mb:.1f} MB"
    )
    assert reconnects >= 20  # the streams really did keep ending
    assert max(latencies) < 10.0  # responsive: a Job within a few resyncs (1 s here)
    assert cluster.operator_alive()
    jobs = {n: c for (plural, n), c in cluster.emulator.created.items() if plural == "jobs"}
    # Each once: tokenizer, the seed's prepare and training, each branch's prepare and training.
    assert all(c == 1 for c in jobs.values()) and len(jobs) == 3 + 2 * BRANCHES
    assert growth_mb < 50  # no leak per reconnect (each one re-lists every object)
