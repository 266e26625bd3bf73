"""One look at a beanstalkd tube: depth by state, oldest ready age, watchers, totals.

Read by the consumer's /metrics at scrape time (``consumer/queue_metrics.py``) and by
``trackbuf status``. The whole look has its own deadline: a hung beanstalkd shows as
a ``NotAnswering`` error for that server within it, never as a wait. Over a pool the
servers are looked at in parallel, so one hung server costs one deadline, not one per
server.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from trackbuf import beanstalk_client

STATES = ("ready", "reserved", "delayed", "buried")
# The consumer's own connections wait up to 10 s for beanstalkd
# (beanstalk_client.IO_TIMEOUT_S); a scrape cannot: Prometheus' default scrape
# timeout is 10 s and often set lower.
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
            raise beanstalk_client.NotAnswering(
                "beanstalkd did not answer within the snapshot deadline"
            )
        return remaining

    def arm(self, client: beanstalk_client.Client) -> beanstalk_client.Client:
        client.set_timeout(self.left())
        return client


def snapshot(
    address: tuple[str, int], tube: str, deadline_s: float = SNAPSHOT_DEADLINE_S
) -> QueueSnapshot:
    """One consistent-enough look at the queue within ``deadline_s`` in all (raises
    on connection errors, TimeoutError included)."""
    deadline = _Deadline(deadline_s)
    client = beanstalk_client.connect(address, tube, watch=False, timeout=deadline.left())
    try:
        server = deadline.arm(client).stats()
        stats: dict[str, Any]
        try:
            stats = dict(deadline.arm(client).stats_tube(tube))
        except beanstalk_client.NotFound:
            stats = {}  # beanstalkd drops a tube nobody uses: it is simply empty
        jobs = {state: int(stats.get(f"current-jobs-{state}", 0)) for state in STATES}
        age = 0
        if jobs["ready"]:
            try:
                job = deadline.arm(client).peek_ready()
                age = int(deadline.arm(client).stats_job(job)["age"])
            except beanstalk_client.NotFound:
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
        except beanstalk_client.CONNECTION_ERRORS as exc:
            return exc

    if len(addresses) == 1:
        return [one(addresses[0])]
    with ThreadPoolExecutor(len(addresses), thread_name_prefix="queue-snapshot") as pool:
        return list(pool.map(one, addresses))
