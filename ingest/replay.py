"""Spool replay: putting spooled jobs back into beanstalkd between live batches.

A round puts up to ``REPLAY_CHUNK`` jobs, oldest first, through the same put path as
live batches (``Putter.put_job``). A record leaves the spool only after its put
succeeded; a failed put leaves it for the next round (and a job put twice this way is
dropped by the consumer, by ``event_id``). Live requests come first: once they wait, a
round stops after ``REPLAY_SLICE_S`` (having put one job at least, so a spool drains
even under steady traffic). Nothing is replayed onto a server above its high-water
mark: replay waits until the consumer has drained it below the low-water mark.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from ingest.metrics import IngestMetrics
from ingest.putter import PutFailed, Putter
from ingest.spool_writer import SpoolWriter
from trackbuf.log import kv

log = logging.getLogger("trackbuf.ingest.enqueue")

REPLAY_CHUNK = 64
REPLAY_SLICE_S = 0.02
# At exit, how often to look again for a server that may take the spool (one above its
# high-water mark, or stalled, may get there before the shutdown deadline).
EXIT_RETRY_S = 0.1


class Replayer:
    def __init__(
        self,
        writer: SpoolWriter,
        putter: Putter,
        metrics: IngestMetrics,
        live_waiting: Callable[[], bool],
        come_back: Callable[[], None],
    ) -> None:
        self._writer = writer
        self._putter = putter
        self._metrics = metrics
        self._live_waiting = live_waiting  # do requests wait for a lane to take them?
        self._come_back = come_back  # ask the lanes for another round soon

    @property
    def usable(self) -> bool:
        """Does its server take puts now (connected, answering, below its mark)?"""
        return self._putter.connected and not self._putter.stalled and not self._putter.full

    @property
    def connected(self) -> bool:
        return self._putter.connected

    @property
    def stalled(self) -> bool:
        return self._putter.stalled

    async def round(self) -> None:
        spool = self._writer.spool
        if spool is None or spool.empty or not self._putter.connected or self._putter.full:
            return
        replayed = 0
        started = time.monotonic()
        try:
            for _ in range(REPLAY_CHUNK):
                if self._putter.full:
                    return  # back above the high-water mark: the rest waits for low water
                late = time.monotonic() - started > REPLAY_SLICE_S
                if replayed and late and self._live_waiting():
                    self._come_back()  # the rest after the live batch
                    break
                body = await self._writer.run(spool.peek)
                if body is None:
                    break
                try:
                    dropped = await self._putter.put_job(body)
                except PutFailed as exc:
                    log.warning(kv("spool_replay_paused", reason=exc))
                    return
                # Drops are counted only now that the record is done: a record whose put
                # failed comes back, and its drops would be counted twice.
                await self._writer.run(spool.replayed, body)
                replayed += 1
                self._metrics.spool_replayed.inc()
                for kind in dropped:
                    self._metrics.event_counter(kind, "lost").inc()
            else:
                self._come_back()  # more to do: the next round comes right after live work
        except Exception:
            log.exception(kv("spool_replay_error"))
        finally:
            self._writer.gauges()
        if replayed and spool.empty:
            log.info(kv("spool_drained"))


async def replay_before_exit(
    writer: SpoolWriter, replayers: Sequence[Replayer], deadline: float
) -> None:
    """At a clean stop: put what the spool holds into beanstalkd before exit, until the
    deadline, so a host that is scaled down or replaced leaves nothing on its disk.

    A server above its high-water mark is waited for (the consumer may drain it in
    time), never overfilled. The stop is not held up when waiting cannot help: no
    server connected, every connected one hung (a command in flight past the stall
    bound), or a replay round that put nothing (the server refused: draining). What
    is left is logged with where it is; the next ingest on this directory, or
    ``trackbuf spool replay --dir`` on any host, replays it."""
    spool = writer.spool
    if spool is None or spool.empty:
        return
    found = spool.pending_events
    reason = "shutdown timeout"
    while not spool.empty:
        left = deadline - time.monotonic()
        connected = [r for r in replayers if r.connected]
        if not connected:
            reason = "no beanstalkd server reachable"
            break
        if all(r.stalled for r in connected):
            reason = "beanstalkd hung"
            break
        if left <= 0:
            break
        usable = [r for r in connected if r.usable]
        before = spool.pending_records
        try:
            async with asyncio.timeout(left):
                if usable:
                    await usable[0].round()
                else:
                    await asyncio.sleep(min(EXIT_RETRY_S, left))
        except TimeoutError:
            break  # a put cut short stays in the spool (replayed later; a duplicate at most)
        if usable and spool.pending_records == before and not spool.empty:
            reason = "beanstalkd refused the replay"
            break
    writer.gauges()
    where = str(spool.directory)
    if spool.empty:
        log.info(kv("spool_replayed_at_exit", events=found, dir=where))
        return
    log.warning(
        kv("spool_left_at_exit", events=spool.pending_events, jobs=spool.pending_records,
           bytes=spool.pending_bytes, dir=where, reason=reason,
           then="the next ingest on this directory or `trackbuf spool replay --dir` replays it")
    )  # fmt: skip
