"""The spool as the enqueuer uses it: on one disk thread, with a timeout.

Spool I/O (appends, fsyncs, replay reads) runs on a single thread so appends stay in
order and an fsync never stalls the event loop. A write that outlasts
``SPOOL_TIMEOUT_S`` (a hung disk) does not keep its requests waiting: they are answered
as UNCONFIRMED, the write carries on, and its events are counted spooled or lost when
it really ends. (A timed-out write cannot be cancelled on the disk thread, so counting
it lost at the timeout would count events that later land and are replayed.)

Events go to the spool in records of at most ``spool.MAX_RECORD`` bytes, the size
replay can always read back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import orjson

from ingest.metrics import IngestMetrics
from ingest.outcomes import Outcome
from ingest.spool import MAX_RECORD, Spool
from trackbuf import codec
from trackbuf.log import kv

log = logging.getLogger("trackbuf.ingest.enqueue")

# A spool write that takes longer than this (a hung disk) stops holding its requests.
SPOOL_TIMEOUT_S = 5.0

T = TypeVar("T")


class SpoolWriter:
    def __init__(self, spool: Spool | None, metrics: IngestMetrics) -> None:
        self.spool = spool
        self._metrics = metrics
        self._lost_counted = 0
        self._spooling = False
        # Events in writes that timed out and have not ended yet.
        self.unconfirmed = 0
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")

    async def open(self) -> None:
        if self.spool is not None:
            await self.run(self.spool.open)
            self.gauges()

    async def close(self) -> None:
        if self.spool is not None:
            await self.run(self.spool.close)
        if self.unconfirmed:
            log.error(kv("spool_writes_unconfirmed_at_exit", events=self.unconfirmed))
        # A disk thread stuck in fsync must not hold the process at exit.
        self._disk.shutdown(wait=False)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._disk, fn, *args)

    def has_room(self, nbytes: int) -> bool:
        return self.spool is not None and self.spool.has_room(nbytes)

    @property
    def empty(self) -> bool:
        return self.spool is None or self.spool.empty

    def outage_over(self) -> None:
        """A put succeeded: the next write to the spool starts a new outage."""
        if self._spooling:
            self._spooling = False
            log.info(kv("spooling_stopped"))

    async def write(self, encoded: list[bytes], reason: str) -> list[Outcome]:
        """Spool these events; one outcome per event, in order."""
        if not self._spooling:
            # Once per outage, not once per event: an outage must not flood the log.
            self._spooling = True
            log.warning(kv("spooling_started", reason=reason))
        outcomes: list[Outcome] = []
        ranges = codec.job_ranges([len(e) for e in encoded], MAX_RECORD, len(encoded))
        for start, end in ranges:
            piece = encoded[start:end]
            outcomes += [await self._append(piece, reason)] * len(piece)
        return outcomes

    async def _append(self, piece: list[bytes], reason: str) -> Outcome:
        body = codec.encode_job(piece)
        if self.spool is None or len(body) > MAX_RECORD:
            # No spool, or one event bigger than any job (HTTP header limits keep real
            # events far below it).
            log.error(kv("enqueue_failed", reason=reason, events=len(piece), spool="none"))
            return Outcome.LOST
        write = asyncio.get_running_loop().run_in_executor(self._disk, self.spool.append, body)
        try:
            async with asyncio.timeout(SPOOL_TIMEOUT_S):
                # Shielded: a timeout stops the wait, never the write (which may be queued
                # behind a hung one and still land).
                appended = await asyncio.shield(write)
        except TimeoutError:
            log.error(kv("spool_write_timeout", timeout_s=SPOOL_TIMEOUT_S, events=len(piece)))
            self.unconfirmed += len(piece)
            write.add_done_callback(lambda done: self._count_late(done, piece))
            return Outcome.UNCONFIRMED
        if not appended:
            log.error(kv("enqueue_failed", reason=reason, events=len(piece), spool="full"))
            return Outcome.LOST
        self.gauges()
        return Outcome.SPOOLED

    def _count_late(self, write: asyncio.Future[bool], piece: list[bytes]) -> None:
        """A timed-out write ended: count its events for what became of them."""
        self.unconfirmed -= len(piece)
        landed = not write.cancelled() and write.exception() is None and write.result()
        outcome = Outcome.SPOOLED if landed else Outcome.LOST
        for encoded in piece:
            kind = codec.item_kind(orjson.loads(encoded))
            self._metrics.event_counter(kind, outcome.value).inc()
        log.warning(kv("spool_write_ended_late", events=len(piece), outcome=outcome.value))
        self.gauges()

    def gauges(self) -> None:
        # Set where the spool changes, not at scrape time: with several ingest
        # processes a scrape reaches one process but reports all of them.
        if self.spool is None:
            return
        self._metrics.spool_bytes.set(self.spool.pending_bytes)
        self._metrics.spool_jobs.set(self.spool.pending_records)
        self._metrics.spool_events.set(self.spool.pending_events)
        # Events in records the disk corrupted, which replay skipped. Counted under
        # "open": a corrupted record's kinds cannot be trusted.
        lost = self.spool.lost_events - self._lost_counted
        if lost:
            self._lost_counted += lost
            self._metrics.event_counter("open", "lost").inc(lost)
