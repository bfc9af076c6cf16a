"""``GET /metrics``: Prometheus text from one registry per server (prometheus_client).

What an autoscaler or a dashboard reads: requests by endpoint and status, request latency, forward sizes (pairs and
requests per forward), forward time, queue depth, requests in flight, pairs scored (``rate()`` of the counter, and a
gauge of pairs per second over the last 10 s), documents cut by ``truncate=true`` and requests refused for a full
queue.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "sparse_ce"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
WINDOW_SECONDS = 10.0


class ServeMetrics:
    """The server's metrics in their own :class:`CollectorRegistry` (several servers in one process stay apart)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created samples: they only add noise to scrapes
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)
        self.latency = Histogram(f"{PREFIX}_request_duration_seconds", "Request latency (scoring endpoints)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_pairs = Histogram(f"{PREFIX}_batch_pairs", "Pairs (rows) per forward", buckets=SIZE_BUCKETS,
                                     registry=registry)
        self.batch_requests = Histogram(f"{PREFIX}_batch_requests", "Requests sharing a forward",
                                        buckets=SIZE_BUCKETS, registry=registry)
        self.forward_seconds = Histogram(f"{PREFIX}_forward_duration_seconds", "Time of one forward",
                                         buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for a forward", registry=registry)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "Scoring requests being answered", registry=registry)
        self.pairs = Counter(f"{PREFIX}_pairs", "Pairs scored", registry=registry)
        self.truncated = Counter(f"{PREFIX}_truncated_documents", "Documents cut to fit (truncate=true)",
                                 registry=registry)
        self.overloaded = Counter(f"{PREFIX}_overloaded", "Requests refused because the queue was full",
                                  registry=registry)
        self.pairs_per_second = Gauge(f"{PREFIX}_pairs_per_second", f"Pairs scored per second over the last "
                                      f"{WINDOW_SECONDS:g} s", registry=registry)
        self.pairs_per_second.set_function(self._rate)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def record_forward(self, pairs: int, requests: int, seconds: float) -> None:
        self.batch_pairs.observe(pairs)
        self.batch_requests.observe(requests)
        self.forward_seconds.observe(seconds)
        self.pairs.inc(pairs)
        with self._lock:
            self._recent.append((time.monotonic(), pairs))

    def _rate(self) -> float:
        cutoff = time.monotonic() - WINDOW_SECONDS
        with self._lock:
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            return sum(pairs for _, pairs in self._recent) / WINDOW_SECONDS

    def render(self) -> bytes:
        return generate_latest(self.registry)
