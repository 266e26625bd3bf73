"""Queue state for Prometheus, read from beanstalkd at scrape time.

Read on scrape rather than polled, so a value is never older than the scrape. One
short-lived connection per scrape; with the usual 5-15 s interval that costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import greenstalk
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from consumer import queue
from trackbuf import metric_names as names

log = logging.getLogger("trackbuf.consumer.queue_metrics")

STATES = ("ready", "reserved", "delayed", "buried")


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


def snapshot(address: tuple[str, int], tube: str) -> QueueSnapshot:
    """One consistent-enough look at the queue (raises on connection errors)."""
    client = queue.connect(address, tube, watch=False)
    try:
        server = client.stats()
        stats: dict[str, Any]
        try:
            stats = dict(client.stats_tube(tube))
        except greenstalk.NotFoundError:
            stats = {}  # beanstalkd drops a tube nobody uses: it is simply empty
        jobs = {state: int(stats.get(f"current-jobs-{state}", 0)) for state in STATES}
        age = 0
        if jobs["ready"]:
            try:
                job = client.peek_ready()
                age = int(client.stats_job(job)["age"])
            except greenstalk.NotFoundError:
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
            log.warning("event=queue_scrape_failed error=%r", exc)
            up.add_metric([], 0)
            yield up
            return
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
