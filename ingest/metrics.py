"""Ingest's Prometheus metrics, registered on a registry the caller chooses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trackbuf import metric_names as names

# Latency buckets in seconds, fine-grained below 10 ms where a healthy pixel lives.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
JOB_EVENT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
ROUTES = ("open", "click")
EVENT_OUTCOMES = ("queued", "spooled", "lost")
# "unconfirmed": the spool write outlasted its timeout; the request was answered and
# its events are counted (spooled or lost) once the write ends.
REQUEST_OUTCOMES = (*EVENT_OUTCOMES, "unconfirmed", "invalid_token", "not_recorded", "error")
TOKEN_REASONS = ("malformed", "too_long", "unknown_kid", "bad_signature", "non_canonical",
                 "bad_url", "wrong_kind", "expired", "host_not_allowed")  # fmt: skip
# Status codes counted by trackbuf_ingest_http_errors_total from the start (at 0): 400
# is aiohttp's answer to a request it cannot parse, 500 to a handler that raised.
HTTP_ERROR_CODES = (400, 500)
# Why a job was put again on another server of a beanstalkd pool: the first one hung
# (it may still store the job), refused it (DRAINING, OUT_OF_MEMORY), or dropped the
# connection (the put may have landed before it did).
REPUT_REASONS = ("stall", "refused", "connection")


@dataclass
class IngestMetrics:
    requests: Counter
    request_duration: Histogram
    events: Counter
    invalid_tokens: Counter
    enqueue_duration: Histogram
    job_events: Histogram
    beanstalkd_up: Gauge
    beanstalkd_servers_up: Gauge
    reputs: Counter
    spool_bytes: Gauge
    spool_jobs: Gauge
    spool_replayed: Counter
    spool_events: Gauge
    queue_held_bytes: Gauge
    queue_full: Gauge
    beanstalkd_hung: Gauge
    buried_on_put: Counter
    http_errors: Counter
    # Label children resolved once: labels() takes a lock and hashes on every call,
    # which is measurable on a path that does little else.
    _children: dict[tuple[str, ...], Any] = field(default_factory=dict)

    def request_counter(self, route: str, outcome: str) -> Any:
        return self._child(("requests", route, outcome), self.requests, route, outcome)

    def event_counter(self, kind: str, outcome: str) -> Any:
        return self._child(("events", kind, outcome), self.events, kind, outcome)

    def invalid_token_counter(self, route: str, reason: str) -> Any:
        return self._child(("invalid", route, reason), self.invalid_tokens, route, reason)

    def duration(self, route: str) -> Any:
        return self._child(("duration", route), self.request_duration, route)

    def http_error(self, status: int) -> None:
        """Count one answer with this status if it is an error a client sees: any
        5xx, or the 400 aiohttp sends for a request it cannot parse. The 404 for a bad
        token is counted by invalid_tokens instead, and other 4xx are not ours."""
        if status >= 500 or status == 400:
            self._child(("http_error", str(status)), self.http_errors, str(status)).inc()

    def _child(self, key: tuple[str, ...], metric: Any, *labels: str) -> Any:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    @classmethod
    def create(cls, registry: CollectorRegistry) -> IngestMetrics:
        metrics = cls._build(registry)
        # Every label set exists from the start at 0, so rate() and increase() see the
        # first error or loss (a series born at 1 has no increase to alert on).
        for route in ROUTES:
            metrics.request_duration.labels(route)
            for outcome in REQUEST_OUTCOMES:
                metrics.requests.labels(route, outcome)
            for reason in TOKEN_REASONS:
                metrics.invalid_tokens.labels(route, reason)
        for kind in ROUTES:
            for outcome in EVENT_OUTCOMES:
                metrics.events.labels(kind, outcome)
        for code in HTTP_ERROR_CODES:
            metrics.http_errors.labels(str(code))
        for reason in REPUT_REASONS:
            metrics.reputs.labels(reason)
        return metrics

    @classmethod
    def _build(cls, registry: CollectorRegistry) -> IngestMetrics:
        return cls(
            requests=Counter(
                names.INGEST_REQUESTS,
                "HTTP requests answered, by route and outcome",
                ["route", "outcome"],
                registry=registry,
            ),
            request_duration=Histogram(
                names.INGEST_REQUEST_DURATION,
                "Time to answer a tracking request, enqueue included",
                ["route"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            events=Counter(
                names.INGEST_EVENTS,
                "Events by where they went: queued in beanstalkd, spooled locally, or lost",
                ["kind", "outcome"],
                registry=registry,
            ),
            invalid_tokens=Counter(
                names.INGEST_INVALID_TOKENS,
                "Requests whose token was rejected (never enqueued)",
                ["route", "reason"],
                registry=registry,
            ),
            enqueue_duration=Histogram(
                names.INGEST_ENQUEUE_DURATION,
                "beanstalkd put round trip for one job",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            job_events=Histogram(
                names.INGEST_JOB_EVENTS,
                "Events carried by one beanstalkd job",
                buckets=JOB_EVENT_BUCKETS,
                registry=registry,
            ),
            beanstalkd_up=Gauge(
                names.INGEST_BEANSTALKD_UP,
                "1 while ingest holds a connection to this beanstalkd server of its pool",
                ["server"],
                registry=registry,
                multiprocess_mode="livemin",
            ),
            beanstalkd_servers_up=Gauge(
                names.INGEST_BEANSTALKD_SERVERS_UP,
                "How many beanstalkd servers of the pool ingest holds a connection to",
                registry=registry,
                multiprocess_mode="livemin",
            ),
            reputs=Counter(
                names.INGEST_JOBS_REPUT,
                "Jobs put again on another beanstalkd server of the pool, by why the first "
                "failed (after a stall the first server may store it too: a duplicate the "
                "consumer drops)",
                ["reason"],
                registry=registry,
            ),
            spool_bytes=Gauge(
                names.INGEST_SPOOL_BYTES,
                "Bytes in the local spool waiting for beanstalkd",
                registry=registry,
                multiprocess_mode="livesum",
            ),
            spool_jobs=Gauge(
                names.INGEST_SPOOL_JOBS,
                "Jobs in the local spool waiting for beanstalkd",
                registry=registry,
                multiprocess_mode="livesum",
            ),
            spool_replayed=Counter(
                names.INGEST_SPOOL_REPLAYED,
                "Spooled jobs put into beanstalkd after an outage",
                registry=registry,
            ),
            spool_events=Gauge(
                names.INGEST_SPOOL_EVENTS,
                "Events in the local spool waiting for beanstalkd",
                registry=registry,
                multiprocess_mode="livesum",
            ),
            queue_held_bytes=Gauge(
                names.INGEST_QUEUE_HELD_BYTES,
                "What ingest estimates this beanstalkd server holds, in bytes of memory "
                "(jobs from stats weighed at the mean job size, plus puts since)",
                ["server"],
                registry=registry,
                multiprocess_mode="livemax",
            ),
            queue_full=Gauge(
                names.INGEST_QUEUE_FULL,
                "1 while this beanstalkd server is above its high-water mark "
                "(TRACKBUF_QUEUE_MAX_BYTES) or refused a put as out of memory: new "
                "events go to the spool",
                ["server"],
                registry=registry,
                multiprocess_mode="livemax",
            ),
            beanstalkd_hung=Gauge(
                names.INGEST_BEANSTALKD_HUNG,
                "1 while this beanstalkd server accepts connections but does not answer",
                ["server"],
                registry=registry,
                multiprocess_mode="livemax",
            ),
            buried_on_put=Counter(
                names.INGEST_BURIED_ON_PUT,
                "Jobs beanstalkd stored as buried on put (out of memory for its ready heap)",
                registry=registry,
            ),
            http_errors=Counter(
                names.INGEST_HTTP_ERRORS,
                "HTTP answers with status >= 500, and 400 for requests that could not be "
                "parsed, by status code",
                ["code"],
                registry=registry,
            ),
        )
