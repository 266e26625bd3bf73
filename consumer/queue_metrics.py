"""Queue state for Prometheus, read from beanstalkd at scrape time.

Read on scrape rather than polled, so a value is never older than the scrape. One
short-lived connection per scrape; with the usual 5-15 s interval that costs nothing.
The whole look at the queue has its own deadline, well inside Prometheus' scrape
timeout: a hung beanstalkd then shows as ``trackbuf_queue_up 0`` while the rest of
the consumer's /metrics still answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from consumer import queue
from trackbuf import metric_names as names
from trackbuf.log import kv

log = logging.getLogger("trackbuf.consumer.queue_metrics")

STATES = ("ready", "reserved", "delayed", "buried")
# The consumer's own connections wait up to 10 s for beanstalkd (queue.IO_TIMEOUT_S);
# a scrape cannot: Prometheus' default scrape timeout is 10 s and often set lower.
SNAPSHOT_DEADLINE_S = 1.0


@dataclass(frozen=True)
class QueueSnapshot:
    tube: str
    jobs: dict[str, int]
    oldest_ready_age_s: int
    consumers: int
    jobs_put: int
    jobs_deleted: int
    binlog_span: int
    max_job_size: int


class _Deadline:
    """What is left of one snapshot's time, applied to the socket before each command."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("beanstalkd did not answer within the snapshot deadline")
        return remaining

    def arm(self, client: queue.Client) -> queue.Client:
        client.set_timeout(self.left())
        return client


def snapshot(
    address: tuple[str, int], tube: str, deadline_s: float = SNAPSHOT_DEADLINE_S
) -> QueueSnapshot:
    """One consistent-enough look at the queue within ``deadline_s`` in all (raises
    on connection errors, TimeoutError included)."""
    deadline = _Deadline(deadline_s)
    client = queue.connect(address, tube, watch=False, timeout=deadline.left())
    try:
        server = deadline.arm(client).stats()
        stats: dict[str, Any]
        try:
            stats = dict(deadline.arm(client).stats_tube(tube))
        except queue.NotFound:
            stats = {}  # beanstalkd drops a tube nobody uses: it is simply empty
        jobs = {state: int(stats.get(f"current-jobs-{state}", 0)) for state in STATES}
        age = 0
        if jobs["ready"]:
            try:
                job = deadline.arm(client).peek_ready()
                age = int(deadline.arm(client).stats_job(job)["age"])
            except queue.NotFound:
                age = 0  # taken between the two commands
        span = int(server.get("binlog-current-index", 0)) - int(
            server.get("binlog-oldest-index", 0)
        )
        return QueueSnapshot(
            tube=tube,
            jobs=jobs,
            oldest_ready_age_s=age,
            consumers=int(stats.get("current-watching", 0)),
            jobs_put=int(stats.get("total-jobs", 0)),
            jobs_deleted=int(stats.get("cmd-delete", 0)),
            binlog_span=max(span, 0),
            max_job_size=int(server.get("max-job-size", 0)),
        )
    finally:
        client.close()


class QueueCollector(Collector):
    def __init__(self, address: tuple[str, int], tube: str) -> None:
        self.address = address
        self.tube = tube
        # Scrapes come every few seconds: an outage is logged when it starts and when
        # it ends, not on every scrape in between.
        self._failing = False
        self._lock = threading.Lock()

    def _outage(self, failing: bool, exc: BaseException | None = None) -> None:
        with self._lock:
            changed, self._failing = self._failing != failing, failing
        if not changed:
            return
        where = f"{self.address[0]}:{self.address[1]}"
        if failing:
            log.warning(kv("queue_scrape_failed", beanstalkd=where, error=repr(exc)))
        else:
            log.info(kv("queue_scrape_recovered", beanstalkd=where))

    def register(self, registry: CollectorRegistry) -> QueueCollector:
        registry.register(self)
        return self

    def describe(self) -> list[Metric]:
        return []  # values come from a server at scrape time; skip the probe on register

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(names.QUEUE_UP, "1 if beanstalkd answered this scrape")
        try:
            snap = snapshot(self.address, self.tube)
        except queue.CONNECTION_ERRORS as exc:
            self._outage(True, exc)
            up.add_metric([], 0)
            yield up
            return
        self._outage(False)
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily(
            names.QUEUE_JOBS, "Jobs in the tube by state", labels=["tube", "state"]
        )
        for state, count in snap.jobs.items():
            jobs.add_metric([self.tube, state], count)
        yield jobs
        age = GaugeMetricFamily(
            names.QUEUE_OLDEST_READY_AGE,
            "Age of the oldest ready job (how far behind the consumer is)",
            labels=["tube"],
        )
        age.add_metric([self.tube], snap.oldest_ready_age_s)
        yield age
        consumers = GaugeMetricFamily(
            names.QUEUE_CONSUMERS, "Connections watching the tube", labels=["tube"]
        )
        consumers.add_metric([self.tube], snap.consumers)
        yield consumers
        put = CounterMetricFamily(
            names.QUEUE_JOBS_PUT, "Jobs put into the tube since beanstalkd started", labels=["tube"]
        )
        put.add_metric([self.tube], snap.jobs_put)
        yield put
        span = GaugeMetricFamily(
            names.QUEUE_BINLOG_SPAN,
            "binlog-current-index minus binlog-oldest-index; grows when old files are pinned",
        )
        span.add_metric([], snap.binlog_span)
        yield span
