"""The operator's Prometheus metrics (prometheus_client), served by a tiny aiohttp endpoint."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# What ``count`` may be asked to count: name -> help text (each a counter by resource kind).
COUNTERS = {
    "reconciles": "Reconciles started",
    "reconcile_errors": "Reconciles that failed with an unexpected error",
    "status_patches": "Status patches written",
    "jobs_created": "Trainer Jobs created",
    "merges": "Results merged into a forest manifest",
    "serving_applied": "Serving Deployments and Services created or updated",
}
RECONCILE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _Phases(Collector):
    """``elmforest_resources{kind,phase}``: how many resources are in each phase, now."""

    def __init__(self, phases: dict[tuple[str, str, str], str]) -> None:
        self.phases = phases

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "elmforest_resources", "Resources by kind and phase", labels=["kind", "phase"]
        )
        for (kind, phase), value in sorted(
            Tally((k, p) for (k, _, _), p in self.phases.items()).items()
        ):
            family.add_metric([kind, phase], value)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.counters = {
            name: Counter(f"elmforest_{name}", text, ["kind"], registry=self.registry)
            for name, text in COUNTERS.items()
        }
        self.reconcile_seconds = Histogram(
            "elmforest_reconcile_duration_seconds",
            "Time one reconcile took",
            ["kind"],
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "elmforest_work_queue_depth",
            "Branches waiting in the branch worker's queue or being reconciled",
            registry=self.registry,
        )
        self.phases: dict[tuple[str, str, str], str] = {}  # (kind, ns, name) -> phase
        self.registry.register(_Phases(self.phases))

    def count(self, name: str, kind: str, amount: int = 1) -> None:
        self.counters[name].labels(kind).inc(amount)

    @contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.reconcile_seconds.labels(kind).observe(time.perf_counter() - started)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def phase(self, kind: str, namespace: str, name: str, phase: str | None) -> None:
        if phase is None:
            self.phases.pop((kind, namespace, name), None)
        else:
            self.phases[kind, namespace, name] = phase

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> web.AppRunner:
        async def handle(_: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner
