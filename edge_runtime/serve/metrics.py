"""``/metrics``: the serving figures in Prometheus' text format, through prometheus-client.

One registry per app (not the process-global one), so two apps in one process, as in the
tests, do not collide. Model labels are the served names only: a request for an unknown
model counts under ``model=""``, so a client cannot grow the label set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    """The counters, gauges and histograms of one server; also a ``HostObserver``."""

    def __init__(self, models: list[str]) -> None:
        self.models = frozenset(models)
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "edgepack_serve_requests",
            "Requests answered, by model, route and HTTP status code.",
            ["model", "route", "code"],
            registry=registry,
        )
        self.errors = Counter(
            "edgepack_serve_errors",
            "Requests answered with an error (status >= 400), by model and code.",
            ["model", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "edgepack_serve_request_seconds",
            "Time from a request's arrival to its answer, by model (successful inferences).",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.rejected = Histogram(
            "edgepack_serve_rejected_seconds",
            "Time to answer a request refused because the model's queue was full.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.queue = Gauge(
            "edgepack_serve_queue_depth",
            "Requests waiting for the model (not counting those running).",
            ["model"],
            registry=registry,
        )
        self.batch_rows = Histogram(
            "edgepack_serve_batch_size",
            "Rows per engine run (several requests stacked by dynamic batching).",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.run_seconds = Histogram(
            "edgepack_serve_inference_seconds",
            "Engine time per run (one batch), by model.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.tokens = Counter(
            "edgepack_serve_tokens",
            "Tokens generated, by model (language models).",
            ["model"],
            registry=registry,
        )
        self.tokens_per_s = Gauge(
            "edgepack_serve_tokens_per_second",
            "Generation speed of the latest completion, by model.",
            ["model"],
            registry=registry,
        )
        for model in models:
            self.queue.labels(model).set(0)

    def label(self, model: str | None) -> str:
        return model if model in self.models else ""

    def answered(
        self, model: str | None, route: str, code: int, seconds: float, rejected: bool = False
    ) -> None:
        """One request answered with HTTP status ``code`` after ``seconds``; ``rejected``:
        refused because the model's queue was full."""
        label = self.label(model)
        self.requests.labels(label, route, str(code)).inc()
        if code >= 400:
            self.errors.labels(label, str(code)).inc()
        if rejected:
            self.rejected.labels(label).observe(seconds)
        elif code < 400 and route in ("infer", "openai"):
            self.latency.labels(label).observe(seconds)

    def generated(self, model: str, tokens: int, seconds: float) -> None:
        """A completion of ``tokens`` tokens took ``seconds`` (for the OpenAI routes)."""
        label = self.label(model)
        self.tokens.labels(label).inc(tokens)
        if seconds > 0 and tokens:
            self.tokens_per_s.labels(label).set(tokens / seconds)

    # -- HostObserver ---------------------------------------------------------------
    def queue_depth(self, model: str, depth: int) -> None:
        self.queue.labels(self.label(model)).set(depth)

    def batch(self, model: str, rows: int, requests: int, seconds: float) -> None:
        label = self.label(model)
        self.batch_rows.labels(label).observe(rows or requests)
        self.run_seconds.labels(label).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
