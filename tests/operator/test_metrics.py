"""The operator's /metrics: Prometheus families with help and type, through prometheus_client."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from elmforest.metrics import Metrics
from elmforest.scheduling.queue import WorkQueue


def families(metrics: Metrics) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def test_counters_phases_durations_and_queue_depth() -> None:
    metrics = Metrics()
    metrics.count("reconciles", "ElmBranch", 3)
    metrics.count("jobs_created", "ElmForest")
    for name, phase in (("a", "Training"), ("b", "Training"), ("c", "Merged")):
        metrics.phase("ElmBranch", "ns", name, phase)
    metrics.phase("ElmBranch", "ns", "c", None)  # deleted: no longer counted
    with metrics.timed("ElmBranch"):
        pass

    async def depth() -> int:
        queue: WorkQueue[str] = WorkQueue()
        metrics.watch_queue(lambda: len(queue))
        queue.add("x")
        queue.add("y")
        await queue.take()
        queue.add("z")
        return len(queue)

    assert asyncio.run(depth()) == 3  # two in flight, one ready
    found = families(metrics)
    reconciles = found["elmforest_reconciles"]
    assert reconciles.type == "counter" and reconciles.documentation  # type: ignore[attr-defined]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in found.values()
        for s in f.samples
    }  # type: ignore[attr-defined]
    assert samples[("elmforest_reconciles_total", (("kind", "ElmBranch"),))] == 3
    assert samples[("elmforest_resources", (("kind", "ElmBranch"), ("phase", "Training")))] == 2
    assert ("elmforest_resources", (("kind", "ElmBranch"), ("phase", "Merged"))) not in samples
    assert found["elmforest_reconcile_duration_seconds"].type == "histogram"  # type: ignore[attr-defined]
    assert samples[("elmforest_reconcile_duration_seconds_count", (("kind", "ElmBranch"),))] == 1
    assert samples[("elmforest_work_queue_depth", ())] == 3
