"""Prometheus metrics of one API process: request latency by route template, embedding batch
sizes, and index sizes (read from the index store at scrape time)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.services.index_backend import IndexBackend


class _IndexSizes(Collector):
    def __init__(self, indexes: IndexBackend) -> None:
        self.indexes = indexes

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "lookalike_index_vectors",
            "Live vectors in each loaded gallery index.",
            labels=["gallery_id", "model_id"],
        )
        for gallery_id, model_id, size in self.indexes.sizes():
            gauge.add_metric([str(gallery_id), str(model_id)], size)
        yield gauge


class Metrics:
    """A registry per app (tests build many apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "lookalike_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.batch_sizes = Histogram(
            "lookalike_embedding_batch_size",
            "Images per embedding forward pass (micro-batching).",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )

    def observe_batch(self, size: int) -> None:
        self.batch_sizes.observe(size)

    def watch(self, indexes: IndexBackend) -> None:
        self.registry.register(_IndexSizes(indexes))


class MetricsMiddleware:
    """Times every HTTP request; labels by the matched route's template, not the raw path."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.latency.labels(
                scope["method"], route_template(scope), str(status)
            ).observe(time.perf_counter() - started)


def route_template(scope: Scope) -> str:
    """The matched route's full template, e.g. /api/v1/images/{image_id} (low cardinality).

    A route of an included router knows only its own part of the path; the prefix is what the
    request path has in front of that part, filled in with the request's path parameters."""
    route = scope.get("route")
    template = getattr(route, "path_format", None)
    if template is None:
        return "unmatched"
    params = {name: str(value) for name, value in scope.get("path_params", {}).items()}
    try:
        concrete = template.format(**params)
    except (KeyError, IndexError, ValueError):
        return template
    path: str = scope["path"]
    return path[: len(path) - len(concrete)] + template if path.endswith(concrete) else template
