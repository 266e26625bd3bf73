"""Per-request metrics kept as plain numbers, added to Prometheus in bulk.

prometheus-client takes a lock and, for a histogram, walks the buckets on every
``inc``/``observe``. A pixel request made three such calls, and under load they cost
about a tenth of its CPU (measured by taking them out). On the event loop a dict
increment does the same job; ``flush`` adds what was counted to the real metrics, at
every scrape of this process and every second (so that, with several ingest processes,
the one answering a scrape reports the others at most a second late).

Only the event loop touches a tally, so it needs no lock.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from ingest.metrics import LATENCY_BUCKETS, ROUTES, IngestMetrics


class RequestTally:
    def __init__(self, metrics: IngestMetrics) -> None:
        self._metrics = metrics
        self._requests: dict[tuple[str, str], int] = {}
        self._events: dict[tuple[str, str], int] = {}
        # Per route: how many answers fell in each latency bucket (the last one +Inf),
        # and their total time, as prometheus-client keeps them.
        self._buckets = {route: [0] * (len(LATENCY_BUCKETS) + 1) for route in ROUTES}
        self._seconds = dict.fromkeys(ROUTES, 0.0)
        for route in ROUTES:
            _histogram_parts(metrics.duration(route))  # fail at start if they moved

    def request(self, route: str, outcome: str, seconds: float) -> None:
        key = (route, outcome)
        self._requests[key] = self._requests.get(key, 0) + 1
        # bisect_left finds the first bound >= seconds: the bucket observe() picks.
        self._buckets[route][bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._seconds[route] += seconds

    def event(self, kind: str, outcome: str) -> None:
        key = (kind, outcome)
        self._events[key] = self._events.get(key, 0) + 1

    def flush(self) -> None:
        requests, self._requests = self._requests, {}
        events, self._events = self._events, {}
        for (route, outcome), count in requests.items():
            self._metrics.request_counter(route, outcome).inc(count)
        for (kind, outcome), count in events.items():
            self._metrics.event_counter(kind, outcome).inc(count)
        for route, counts in self._buckets.items():
            if not any(counts):
                continue
            self._buckets[route] = [0] * len(counts)
            seconds, self._seconds[route] = self._seconds[route], 0.0
            total, buckets = _histogram_parts(self._metrics.duration(route))
            total.inc(seconds)
            for bucket, count in zip(buckets, counts, strict=True):
                if count:
                    bucket.inc(count)


def _histogram_parts(child: Any) -> tuple[Any, list[Any]]:
    """A histogram child's sum and per-bucket values (not cumulative), the values its
    own observe() increments. prometheus-client has no public call to add many
    observations at once; tests/unit/test_tally.py compares the result with observe()."""
    total, buckets = child._sum, child._buckets
    if len(buckets) != len(LATENCY_BUCKETS) + 1:
        raise RuntimeError("prometheus-client histogram layout changed: update ingest/tally.py")
    return total, buckets
