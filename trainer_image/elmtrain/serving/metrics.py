"""The server's Prometheus metrics (``/metrics``), in a registry of its own per server."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from a few milliseconds (one token of a tiny model) to minutes (long answers).
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "elmserve_requests", "Completion requests answered", ["model", "code"], registry=r
        )
        self.tokens = Counter(
            "elmserve_tokens", "Tokens read (prompt) and written (completion)", ["kind"], registry=r
        )
        self.latency = Histogram(
            "elmserve_request_seconds",
            "Time from request to last token",
            buckets=LATENCY,
            registry=r,
        )
        self.first_token = Histogram(
            "elmserve_time_to_first_token_seconds",
            "Time from a streamed request to its first token",
            buckets=LATENCY,
            registry=r,
        )
        self.expert_requests = Counter(
            "elmserve_expert_requests", "Requests routed to each expert", ["expert"], registry=r
        )
        self.expert_excluded = Counter(
            "elmserve_expert_excluded",
            "Requests that opted an expert out (elmforest.experts)",
            ["expert"],
            registry=r,
        )
        self.forwards = Counter(
            "elmserve_model_forwards",
            "Forward passes of each model (a prompt read, a decode step, a scoring pass): an "
            "expert opted out of every request never counts one",
            ["model"],
            registry=r,
        )
        self.batch = Histogram(
            "elmserve_decode_batch_size",
            "Sequences decoded by one forward pass of one model",
            buckets=BATCH,
            registry=r,
        )
        self.prefill = Histogram(
            "elmserve_prefill_batch_size",
            "Prompts read by one forward pass of one model",
            buckets=BATCH,
            registry=r,
        )
        self.in_flight = Gauge("elmserve_requests_in_flight", "Requests being served", registry=r)
        self.revision = Gauge(
            "elmserve_manifest_revision",
            "Manifest revision of the set serving new requests",
            registry=r,
        )
        self.experts = Gauge("elmserve_experts", "Experts in the serving set", registry=r)
        self.reloads = Counter(
            "elmserve_reloads", "Loads of a new manifest revision", ["outcome"], registry=r
        )
        self.load_failures = Gauge(
            "elmserve_load_failures",
            "Failed attempts in a row at the newest revision (0: it serves); the last good "
            "revision serves meanwhile",
            registry=r,
        )

    def engine_hook(self, what: str, value: Any) -> None:
        """What the engine thread reports (prometheus_client is thread-safe)."""
        if what == "token":
            self.tokens.labels("completion").inc(value)
        elif what == "batch":
            self.batch.observe(value)
        elif what == "prefill":
            self.prefill.observe(value)
        elif what == "expert":
            self.expert_requests.labels(value).inc()
        elif what == "forward":
            self.ran(value)

    def ran(self, model: str) -> None:
        """A forward pass of ``model`` (a member's label: expert/<d>, seed, average)."""
        self.forwards.labels(model).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
