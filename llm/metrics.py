"""`GET /metrics` on every server (serve-experts, serve-model, capture): what `/health` says, in the text format
Prometheus scrapes, and the seconds of each answered chat call per operation and per who answered it. /health is
a snapshot an operator reads; a scraper keeps the history (the share of calls the experts keep, night after night
of promotions; the latency of a kept call against a deferred one).

Names follow /health, so one document serves both: each `counts` mapping is a counter `<prefix>_events_total`
with the count's name as its `event` label (`memlora_events_total{event="extraction_reduced"}`,
`memlora_deferral_events_total{event="kept_update"}`); every other number is a gauge named by its path
(`memlora_queue_waiting`, `memlora_rss_mib`, `memlora_experts_reloads`); a text is an `..._info` gauge of 1 with
the text as its label (`memlora_experts_version_info{version="v3"}`). One registry per server, so servers in one
process never share a series."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# From a 50 ms generation answer to a deferred extraction call that waited behind a full batch.
SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def metric_name(*parts: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", "_".join(parts))


def health_metrics(health: dict, prefix: str = "memlora") -> Iterator[Metric]:
    """The metric families of a /health document (see the module's docstring); lists and nulls are left out."""
    for key, value in health.items():
        name = metric_name(prefix, key)
        if key == "counts" and isinstance(value, dict):
            family = CounterMetricFamily(metric_name(prefix, "events"), f"{prefix} counts at /health",
                                         labels=["event"])
            for event, count in sorted(value.items()):
                family.add_metric([str(event)], float(count))
            yield family
        elif isinstance(value, dict):
            yield from health_metrics(value, name)
        elif isinstance(value, (bool, int, float)):
            yield GaugeMetricFamily(name, f"{key} at /health", value=float(value))
        elif isinstance(value, str) and key != "last_error":
            info = GaugeMetricFamily(f"{name}_info", f"{key} at /health", labels=[metric_name(key)])
            info.add_metric([value], 1.0)
            yield info


class _HealthCollector:
    def __init__(self, health: Callable[[], dict]):
        self.health = health

    def collect(self) -> Iterator[Metric]:
        yield from health_metrics(self.health())


class ServerMetrics:
    """A server's registry: its /health, read at each scrape, and its calls' seconds."""

    def __init__(self, health: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_HealthCollector(health))
        self.seconds = Histogram(
            "memlora_chat_seconds", "seconds from a chat call's arrival to its answer (a stream: to its start)",
            ["operation", "answered_by", "stream"], buckets=SECONDS, registry=self.registry)

    def answered(self, request, response, answered_by: str, started: float) -> None:
        """Time a chat call from `started` (perf_counter) to `response`, under the operation its handler put in
        `request.state.operation`; a call answered with an error (4xx, 5xx, 499) is counted at /health, not timed."""
        if response.status_code >= 400:
            return
        stream = response.headers.get("content-type", "").startswith("text/event-stream")
        self.seconds.labels(getattr(request.state, "operation", None) or "other", answered_by,
                            str(stream).lower()).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def serve_metrics(app, health: Callable[[], dict]) -> ServerMetrics:
    """GET /metrics on a FastAPI `app` whose /health is `health()`; returns the registry its calls are timed in."""
    from fastapi import Response

    metrics = ServerMetrics(health)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return metrics
