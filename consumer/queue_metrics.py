"""Queue state for Prometheus, read from beanstalkd at scrape time.

Read on scrape rather than polled, so a value is never older than the scrape. One
short-lived connection per scrape; with the usual 5-15 s interval that costs nothing.
The whole look at the queue has its own deadline, well inside Prometheus' scrape
timeout: a hung beanstalkd then shows as ``trackbuf_queue_up 0`` while the rest of
the consumer's /metrics still answers.

Over a pool every series carries a ``server`` label ("host:port"); the servers are
looked at in parallel, so one hung server costs the scrape one deadline, not one per
server. There is no unlabeled total: every consumer process exports the same
beanstalkd stats, so a pool-wide figure is ``sum(max by (server) (...))`` (the max
folds the consumer instances, the sum adds the servers).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trackbuf import metric_names as names
from trackbuf.beanstalk_client import NotAnswering
from trackbuf.log import kv
from trackbuf.queue_snapshot import QueueSnapshot, server_name, snapshots

log = logging.getLogger("trackbuf.consumer.queue_metrics")


class QueueFamilies(NamedTuple):
    """The queue metrics of one scrape, empty until filled (also what the metric
    reference in docs/MONITORING.md is generated from)."""

    up: GaugeMetricFamily
    hung: GaugeMetricFamily
    jobs: GaugeMetricFamily
    age: GaugeMetricFamily
    consumers: GaugeMetricFamily
    put: CounterMetricFamily
    span: GaugeMetricFamily


def families() -> QueueFamilies:
    return QueueFamilies(
        up=GaugeMetricFamily(
            names.QUEUE_UP, "1 if this beanstalkd server answered the scrape", labels=["server"]
        ),
        hung=GaugeMetricFamily(
            names.QUEUE_HUNG,
            "1 if this beanstalkd server took the connection but did not answer in time "
            "(memory pressure, a stuck disk, stopped)",
            labels=["server"],
        ),
        jobs=GaugeMetricFamily(
            names.QUEUE_JOBS, "Jobs in the tube by state", labels=["server", "tube", "state"]
        ),
        age=GaugeMetricFamily(
            names.QUEUE_OLDEST_READY_AGE,
            "Age of the oldest ready job (how far behind the consumer is)",
            labels=["server", "tube"],
        ),
        consumers=GaugeMetricFamily(
            names.QUEUE_CONSUMERS, "Connections watching the tube", labels=["server", "tube"]
        ),
        put=CounterMetricFamily(
            names.QUEUE_JOBS_PUT,
            "Jobs put into the tube since beanstalkd started",
            labels=["server", "tube"],
        ),
        span=GaugeMetricFamily(
            names.QUEUE_BINLOG_SPAN,
            "binlog-current-index minus binlog-oldest-index; grows when old files are pinned",
            labels=["server"],
        ),
    )


class QueueCollector(Collector):
    def __init__(self, addresses: Sequence[tuple[str, int]], tube: str) -> None:
        self.addresses = list(addresses)
        self.tube = tube
        # Scrapes come every few seconds: an outage is logged when it starts and when
        # it ends, not on every scrape in between (per server).
        self._failing: set[str] = set()
        self._lock = threading.Lock()

    def _outage(self, where: str, failing: bool, exc: BaseException | None = None) -> None:
        with self._lock:
            changed = (where in self._failing) != failing
            if failing:
                self._failing.add(where)
            else:
                self._failing.discard(where)
        if not changed:
            return
        if failing:
            # hung: it took the connection and did not answer, which a restart under
            # more memory (or a look at its disk) cures, and reconnecting does not.
            hung = isinstance(exc, NotAnswering)
            log.warning(kv("queue_scrape_failed", beanstalkd=where, hung=hung, error=repr(exc)))
        else:
            log.info(kv("queue_scrape_recovered", beanstalkd=where))

    def register(self, registry: CollectorRegistry) -> QueueCollector:
        registry.register(self)
        return self

    def describe(self) -> list[Metric]:
        return []  # values come from a server at scrape time; skip the probe on register

    def collect(self) -> Iterator[Metric]:
        up, hung, jobs, age, consumers, put, span = families()
        for address, snap in zip(self.addresses, snapshots(self.addresses, self.tube), strict=True):
            server = server_name(address)
            if not isinstance(snap, QueueSnapshot):
                self._outage(server, True, snap)
                up.add_metric([server], 0)
                hung.add_metric([server], 1 if isinstance(snap, NotAnswering) else 0)
                continue
            self._outage(server, False)
            up.add_metric([server], 1)
            hung.add_metric([server], 0)
            for state, count in snap.jobs.items():
                jobs.add_metric([server, self.tube, state], count)
            age.add_metric([server, self.tube], snap.oldest_ready_age_s)
            consumers.add_metric([server, self.tube], snap.consumers)
            put.add_metric([server, self.tube], snap.jobs_put)
            span.add_metric([server], snap.binlog_span)
        yield up
        yield hung
        # A family with no samples (every server down) is left out, as before.
        for family in (jobs, age, consumers, put, span):
            if family.samples:
                yield family
