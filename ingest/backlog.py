"""How much one beanstalkd server holds, and whether ingest may put more on it.

beanstalkd keeps every job in memory and has no limit of its own: a database outage
longer than the host's memory allows ends with the kernel killing it, and its binlog
replay at restart needs the same memory again. So ingest keeps each server under a
high-water mark (``TRACKBUF_QUEUE_MAX_BYTES``) and sends what is beyond it to its own
disk spool, replayed once the server has drained below the low-water mark
(``LOW_WATER`` of the high one).

What a server holds is estimated from both sources there are, because neither is
enough alone:

- ``stats``, polled every ``POLL_S`` on a connection of its own: the server's job count
  over all tubes and all ingests, deletes by the consumer included. beanstalkd reports
  no byte count, so jobs are weighed at the mean size of the jobs this ingest put plus
  beanstalkd's own cost per job (``JOB_OVERHEAD_BYTES``).
- ingest's own puts since that ``stats`` was asked: between two polls a burst can put
  many megabytes, and waiting for the next poll would let it run past the mark.

The poll doubles as the check that the server answers: a server that accepts
connections and then never replies (memory pressure, a stuck disk, SIGSTOP) is
reported ``hung`` (log, metric) once ``stats`` or the connection's first command has
gone ``bsproto.IO_TIMEOUT_S`` without an answer.

``OUT_OF_MEMORY`` from a put means the server reached a limit below the mark (its
memory is smaller than the mark assumed): the server counts as full at what it holds
now, and takes puts again once below ``LOW_WATER`` of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ingest import bsproto
from ingest.metrics import IngestMetrics
from trackbuf.log import kv

__all__ = ["JOB_OVERHEAD_BYTES", "LOW_WATER", "Backlog"]

log = logging.getLogger("trackbuf.ingest.backlog")

# Puts start again once the estimate is below this share of the high-water mark: the
# gap keeps a server at the mark from flapping between beanstalkd and the spool at
# every poll, and leaves replay a quarter of the mark to refill.
LOW_WATER = 0.75
POLL_S = 0.5
# beanstalkd's memory per job beyond its body: the job record, its hash-table and heap
# entries and malloc's rounding. Measured (beanstalkd 1.12): 20,000 jobs of 3,000 bytes
# grew its RSS by 3,214 bytes per job, 50,000 of 300 bytes by 510 per job: 210-214 bytes
# on top of the body (docs/SCALING.md, "Sizing the high-water mark").
JOB_OVERHEAD_BYTES = 224
# Until this ingest has put a job, jobs found on the server are weighed at this size
# (a job of 25 events, the size under steady load in BENCHMARKS.md).
DEFAULT_JOB_BYTES = 4096
MEAN_WEIGHT = 0.05  # of the newest job in the running mean of job sizes
JOB_STATES = ("ready", "reserved", "delayed", "buried")


class Backlog:
    """One server's backlog as this ingest sees it, with its high-water hysteresis."""

    def __init__(
        self,
        address: tuple[str, int],
        tube: str,
        high_water: int,
        metrics: IngestMetrics,
        on_change: Callable[[], None],
    ) -> None:
        self._address = address
        self._tube = tube
        self.server = f"{address[0]}:{address[1]}"
        self.high_water = high_water
        self._ceiling = high_water  # lowered by OUT_OF_MEMORY until the server drains
        self._metrics = metrics
        self._on_change = on_change
        self.jobs = 0  # on the server at the latest stats
        self.mean_job_bytes = float(DEFAULT_JOB_BYTES)
        self._put_bytes = 0  # everything this ingest put, with the overhead
        self._put_at_poll = 0  # _put_bytes when the latest answered stats was asked
        self.full = False  # above the mark: new events go to the spool
        self.hung = False  # accepts connections, does not answer
        self.polled = False  # a stats has answered since the start
        self._task: asyncio.Task[None] | None = None
        metrics.queue_full.labels(self.server).set(0)
        metrics.beanstalkd_hung.labels(self.server).set(0)

    # The estimate -----------------------------------------------------------------------

    @property
    def held_bytes(self) -> int:
        per_job = self.mean_job_bytes + JOB_OVERHEAD_BYTES
        return int(self.jobs * per_job) + self._put_bytes - self._put_at_poll

    @property
    def low_water(self) -> int:
        return int(self._ceiling * LOW_WATER)

    def put(self, body_bytes: int) -> None:
        """A job of ``body_bytes`` was stored on the server."""
        self.mean_job_bytes += MEAN_WEIGHT * (body_bytes - self.mean_job_bytes)
        self._put_bytes += body_bytes + JOB_OVERHEAD_BYTES
        if not self.full and self.held_bytes >= self._ceiling:
            self._set_full(True, "high_water")

    def out_of_memory(self) -> None:
        """The server refused a put with OUT_OF_MEMORY: it is full at what it holds."""
        held = self.held_bytes
        if held > 0:
            self._ceiling = min(self._ceiling, held)
        if not self.full:
            self._set_full(True, "out_of_memory")

    def note_queue_stats(self, jobs: int, put_at_ask: int) -> None:
        """A stats answer: ``jobs`` on the server, asked when _put_bytes was
        ``put_at_ask`` (puts after that are not in the count)."""
        self.jobs = jobs
        self._put_at_poll = put_at_ask
        self.polled = True
        held = self.held_bytes
        self._metrics.queue_held_bytes.labels(self.server).set(held)
        if not self.full and held >= self._ceiling:
            self._set_full(True, "high_water")
        elif self.full and held <= self.low_water:
            self._ceiling = self.high_water
            self._set_full(False, "low_water")

    def _set_full(self, full: bool, why: str) -> None:
        self.full = full
        self._metrics.queue_full.labels(self.server).set(1 if full else 0)
        event = "queue_high_water" if full else "queue_low_water"
        log.warning(
            kv(event, server=self.server, reason=why, held_bytes=self.held_bytes,
               jobs=self.jobs, high_water_bytes=self.high_water, low_water_bytes=self.low_water)
        )  # fmt: skip
        self._on_change()

    # Polling ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"backlog {self.server}"
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=0.1)

    async def poll_once(self, conn: bsproto.Connection) -> None:
        asked = self._put_bytes
        stats = await conn.stats()
        jobs = sum(_int(stats.get(f"current-jobs-{state}")) for state in JOB_STATES)
        self._clear_hung()
        self.note_queue_stats(jobs, asked)

    async def _run(self) -> None:
        conn: bsproto.Connection | None = None
        try:
            while True:
                try:
                    if conn is None:
                        conn = await bsproto.Connection.open(self._address, self._tube)
                    await self.poll_once(conn)
                except bsproto.ConnectTimedOut:
                    # No handshake at all: unreachable (the put path reports it), not hung.
                    self._clear_hung()
                except bsproto.TimedOut as exc:
                    self._no_answer(exc)
                    _close(conn)
                    conn = None
                except bsproto.ConnectionLost:
                    # Down or restarting, which the put path reports; not hung.
                    self._clear_hung()
                    _close(conn)
                    conn = None
                except Exception:
                    log.exception(kv("backlog_poll_error", server=self.server))
                    _close(conn)
                    conn = None
                await asyncio.sleep(POLL_S)
        finally:
            _close(conn)

    def _no_answer(self, exc: BaseException) -> None:
        if not self.hung:
            self.hung = True
            self._metrics.beanstalkd_hung.labels(self.server).set(1)
            log.error(kv("beanstalkd_hung", server=self.server, error=exc))

    def _clear_hung(self) -> None:
        if self.hung:
            self.hung = False
            self._metrics.beanstalkd_hung.labels(self.server).set(0)
            log.info(kv("beanstalkd_answers_again", server=self.server))


def _int(value: int | str | None) -> int:
    return value if isinstance(value, int) else 0


def _close(conn: bsproto.Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()
