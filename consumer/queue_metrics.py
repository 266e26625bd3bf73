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
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

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
            # Only ever after the connection is made (the first call starts the clock):
            # commands answered too slowly to finish in time, which is hung all the same.
            raise queue.NotAnswering("beanstalkd did not answer within the snapshot deadline")
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


def server_name(address: tuple[str, int]) -> str:
    """The ``server`` label of a pool member: "host:port" as configured."""
    return f"{address[0]}:{address[1]}"


def snapshots(
    addresses: Sequence[tuple[str, int]], tube: str, deadline_s: float = SNAPSHOT_DEADLINE_S
) -> list[QueueSnapshot | BaseException]:
    """A snapshot of every server, in pool order, taken in parallel; a server that
    could not be read gives its connection error instead."""

    def one(address: tuple[str, int]) -> QueueSnapshot | BaseException:
        try:
            return snapshot(address, tube, deadline_s)
        except queue.CONNECTION_ERRORS as exc:
            return exc

    if len(addresses) == 1:
        return [one(addresses[0])]
    with ThreadPoolExecutor(len(addresses), thread_name_prefix="queue-snapshot") as pool:
        return list(pool.map(one, addresses))


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
            hung = isinstance(exc, queue.NotAnswering)
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
                hung.add_metric([server], 1 if isinstance(snap, queue.NotAnswering) else 0)
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
