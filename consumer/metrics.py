"""The consumer's Prometheus metrics, registered on a registry the caller chooses."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from trackbuf import metric_names as names

BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# End-to-end spans a healthy sub-second pipeline and an hours-long outage backlog.
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)


@dataclass
class ConsumerMetrics:
    events_written: Counter
    duplicates: Counter
    batches: Counter
    batch_events: Histogram
    insert_duration: Histogram
    end_to_end: BucketHistogram
    database_up: Gauge
    dead_events: Counter
    kicked_jobs: Counter
    buried_jobs: Counter
    reserve_commands: Counter
    jobs_reserved: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ConsumerMetrics:
        metrics = cls._build(registry)
        # Label sets exist at 0 from the start so increase() sees the first one.
        for outcome in ("committed", "released", "split"):
            metrics.batches.labels(outcome)
        for reason in ("undecodable_job", "invalid_event", "rejected_by_database"):
            metrics.dead_events.labels(reason)
        return metrics

    @classmethod
    def _build(cls, registry: CollectorRegistry) -> ConsumerMetrics:
        return cls(
            events_written=Counter(
                names.CONSUMER_EVENTS_WRITTEN,
                "Events newly stored in PostgreSQL",
                registry=registry,
            ),
            duplicates=Counter(
                names.CONSUMER_DUPLICATES,
                "Events skipped because their event_id was already stored",
                registry=registry,
            ),
            batches=Counter(
                names.CONSUMER_BATCHES,
                "Database batches by outcome (committed, released, split)",
                ["outcome"],
                registry=registry,
            ),
            batch_events=Histogram(
                names.CONSUMER_BATCH_EVENTS,
                "Events per committed batch",
                buckets=BATCH_BUCKETS,
                registry=registry,
            ),
            insert_duration=Histogram(
                names.CONSUMER_INSERT_DURATION,
                "Time of one batch insert statement, commit included",
                buckets=DURATION_BUCKETS,
                registry=registry,
            ),
            end_to_end=BucketHistogram(
                names.CONSUMER_E2E_LATENCY,
                "From the request (occurred_at) to the commit, per delivered event (timed per job)",
                E2E_BUCKETS,
                registry,
            ),
            database_up=Gauge(
                names.CONSUMER_DATABASE_UP,
                "1 while the consumer can write to PostgreSQL",
                registry=registry,
            ),
            dead_events=Counter(
                names.CONSUMER_DEAD_EVENTS,
                "Jobs or events set aside in dead_letters, by reason",
                ["reason"],
                registry=registry,
            ),
            kicked_jobs=Counter(
                names.CONSUMER_KICKED_JOBS,
                "Buried jobs (put or released while beanstalkd was out of memory) kicked "
                "back to ready",
                registry=registry,
            ),
            buried_jobs=Counter(
                names.CONSUMER_BURIED_JOBS,
                "Jobs the consumer released that beanstalkd buried (out of memory); the "
                "kicker makes them ready again",
                registry=registry,
            ),
            reserve_commands=Counter(
                names.CONSUMER_RESERVE_COMMANDS,
                "reserve-with-timeout commands sent to beanstalkd (blocking ones and "
                "pipelined ones); per job reserved, 1 to 1.5 when waiting works, more "
                "when the consumer polls",
                registry=registry,
            ),
            jobs_reserved=Counter(
                names.CONSUMER_JOBS_RESERVED,
                "Jobs reserved from beanstalkd (each delivery counts, a redelivery too)",
                registry=registry,
            ),
        )


class BucketHistogram(Collector):
    """A histogram that takes one value observed many times at once.

    prometheus-client's Histogram takes one observation at a time; the consumer times
    a whole job (tens of events) with one value, and a batch holds hundreds of jobs.
    """

    def __init__(
        self, name: str, documentation: str, bounds: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, value: float, count: int = 1) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value.
        slot = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[slot] += count
            self._sum += value * count

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=cumulative, sum_value=total
        )
