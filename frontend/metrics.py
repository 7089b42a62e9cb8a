"""Prometheus metrics of the frontend, served on `/metrics`.

Each app gets its own registry so that several apps in one process (tests) do not collide.
Latencies are what users feel: time to first token and the gap between streamed tokens.

Several frontend processes (`frontend.workers` > 1) share one port, so a scrape reaches any
one of them: they run prometheus-client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`, set
by the plan before Python starts): every process writes its values to files there and each
`/metrics` answers with the sum over all processes (counters and histograms summed, the
in-flight gauge summed over live processes). The KV index size is per process (each holds a
full index) and reported by the answering one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_ITL_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
)


class FrontendMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # what /metrics renders: this registry, or in multiprocess mode every process's files
        self.scrape_registry = self.registry
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        if self.multiprocess_dir is not None:
            Path(self.multiprocess_dir).mkdir(parents=True, exist_ok=True)
            _forget_dead_processes(self.multiprocess_dir)
            self.scrape_registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.scrape_registry, self.multiprocess_dir)
        self.requests = Counter(
            "hpcserve_frontend_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str], Counter] = {}
        self.in_flight = Gauge(
            "hpcserve_frontend_requests_in_flight",
            "requests being served now",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.ttft = Histogram(
            "hpcserve_frontend_time_to_first_token_seconds",
            "from request arrival to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "hpcserve_frontend_inter_token_latency_seconds",
            "gap between generated tokens (a chunk's gap split over its tokens)",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "hpcserve_frontend_request_duration_seconds",
            "from request arrival to the last token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "hpcserve_frontend_prompt_tokens",
            "prompt tokens of finished requests (once per request, whatever its n)",
            registry=self.registry,
        )
        self.cached_prompt_tokens = Counter(
            "hpcserve_frontend_cached_prompt_tokens",
            "prompt tokens the engines took from their prefix cache instead of computing them "
            "(each of a request's n choices counts its own)",
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "hpcserve_frontend_completion_tokens",
            "generated tokens of finished requests",
            registry=self.registry,
        )
        self.embedding_inputs = Counter(
            "hpcserve_frontend_embedding_inputs",
            "inputs embedded by /v1/embeddings (their tokens count in prompt_tokens)",
            registry=self.registry,
        )
        self.migrations = Counter(
            "hpcserve_frontend_migrations",
            "requests re-sent to another worker after losing theirs mid-stream (migrated), "
            "or failed because no worker or no migration was left (exhausted)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("migrated", "exhausted"):  # both series exist from the start, at 0
            self.migrations.labels(outcome)
        self.media_items = Counter(
            "hpcserve_frontend_media_items",
            "images (kind image) and precomputed embedding files (kind embeds) accepted",
            ["kind"],
            registry=self.registry,
        )
        self.media_bytes = Counter(
            "hpcserve_frontend_media_bytes",
            "bytes of the accepted media payloads (what the workers fetch)",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("image", "embeds"):
            self.media_items.labels(kind)
            self.media_bytes.labels(kind)
        self.media_intake = Histogram(
            "hpcserve_frontend_media_intake_seconds",
            "loading and checking one request's images (download, header, embedding, hash)",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.background_running = Gauge(
            "hpcserve_frontend_background_responses",
            "/v1/responses with background true running now (each process's bounded by "
            "frontend.max_background_responses)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.background_ended = Counter(
            "hpcserve_frontend_background_responses_ended",
            "background /v1/responses that ended, by status (completed, incomplete, failed, "
            "cancelled)",
            ["status"],
            registry=self.registry,
        )
        self.media_store_bytes = Gauge(
            "hpcserve_frontend_media_store_bytes",
            "media bytes held for requests in flight (multimodal.store_max_bytes bounds it)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def count_request(self, endpoint: str, status: str) -> None:
        """One more `requests` sample; the labelled child is kept (`labels()` takes a lock
        and builds its key on every call: a measurable part of a c=1 request's metrics)."""
        child = self._request_children.get((endpoint, status))
        if child is None:
            child = self.requests.labels(endpoint, status)
            self._request_children[(endpoint, status)] = child
        child.inc()

    def count_answered(self, endpoint: str, status: str) -> None:
        """A whole answer was sent: one more `requests` sample, one fewer in flight."""
        self.count_request(endpoint, status)
        self.in_flight.dec()

    def track_kv_index(self, num_blocks: Callable[[], int]) -> None:
        """Expose the KV router's index size (read at scrape time)."""
        self.scrape_registry.register(_KvIndexCollector(num_blocks))

    def track_supervisor(self, status_file: Path) -> None:
        """Expose the supervisor's restart count per component (`hpcserve_component_restarts
        _total`), read from its status file at scrape time: the supervisor serves no HTTP."""
        self.scrape_registry.register(_SupervisorCollector(status_file))

    def render(self) -> bytes:
        return generate_latest(self.scrape_registry)


def _forget_dead_processes(folder: str) -> None:
    """Drop the live-gauge files of processes that are gone (a restarted frontend process
    has a new pid; its predecessor's in-flight count must not stay in the sum)."""
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            multiprocess.mark_process_dead(int(pid), folder)


class _KvIndexCollector:
    """The KV router's index size, read at scrape time (this process's own index)."""

    def __init__(self, num_blocks: Callable[[], int]) -> None:
        self.num_blocks = num_blocks

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "hpcserve_frontend_kv_index_blocks",
            "KV blocks the KV router knows workers hold (a block once per worker holding it)",
            value=float(self.num_blocks()),
        )


class _SupervisorCollector:
    def __init__(self, status_file: Path) -> None:
        self.status_file = status_file

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "hpcserve_component_restarts",
            "times the supervisor restarted a component after it crashed",
            labels=["component"],
        )
        try:
            restarts = json.loads(self.status_file.read_text()).get("restarts", {})
        except (OSError, ValueError):
            restarts = {}
        for component, count in sorted(restarts.items()):
            family.add_metric([component], float(count))
        yield family
