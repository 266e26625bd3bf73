"""The put path: getting job bodies into beanstalkd, for live batches and spool replay.

One place knows how a job reaches beanstalkd: the connection (``bsproto.Link``, which
reconnects in the background), the stall timer armed around every command, packing
events into jobs under the size limit, splitting a job the server refuses as too big,
and learning the server's real limit when it is lower than the configured one.

A command still in flight after the stall bound (``PUT_STALL_S`` for a single server,
``POOL_STALL_S`` when there are others to hand its requests to) means beanstalkd is
hung. The putter does not cancel it (the events in a put that was handed to beanstalkd
may still be stored, and spooling them too would store them twice); it calls
``on_stall`` so its owner can answer later requests elsewhere (the spool, or another
server), and ``on_resume`` once the command has ended either way.

It also keeps the server under its high-water mark (``backlog.Backlog``): ``full``
says the server holds more than it should be given, and the owner then sends live
events to the spool and holds replay back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import orjson

from ingest import bsproto
from ingest.backlog import Backlog
from ingest.metrics import IngestMetrics
from ingest.outcomes import Outcome
from trackbuf import codec
from trackbuf.log import kv

log = logging.getLogger("trackbuf.ingest.enqueue")

# A healthy put answers within a millisecond, even with beanstalkd fsyncing each one
# (-f 0; BENCHMARKS.md "beanstalkd fsync setting"); one this slow means beanstalkd is
# hung, and later batches stop waiting for it. Set too low it only sends batches to the
# spool early, never loses one.
PUT_STALL_S = 0.25
# Among several servers, a put still unanswered after this goes to another server.
# Shorter than PUT_STALL_S because there a stall costs only a re-put on a healthy
# server, not a trip to the spool, and the requests inside the stalled put wait exactly
# this long. A healthy put answers in about a millisecond, so 0.1 s still leaves room
# for a slower network or an fsyncing server; set too low it only makes duplicates the
# consumer drops.
POOL_STALL_S = 0.1
MAX_EVENTS_PER_JOB = 1000

T = TypeVar("T")


class PutFailed(Exception):
    """The job was not stored by beanstalkd; the message says why."""


class Putter:
    def __init__(
        self,
        address: tuple[str, int],
        tube: str,
        ttr: int,
        max_job_bytes: int,
        metrics: IngestMetrics,
        on_stall: Callable[[], None],
        on_resume: Callable[[], None],
        on_link_change: Callable[[bool], None],
        stall_s: float = PUT_STALL_S,
        high_water: int = 1 << 62,
    ) -> None:
        self._tube = tube
        self._stall_s = stall_s
        self.server = f"{address[0]}:{address[1]}"
        self._ttr = ttr
        # Never above what the spool can hold as one record (settings enforce it too).
        self._wanted_job_bytes = min(max_job_bytes, codec.MAX_JOB_BYTES)
        self.job_bytes = self._wanted_job_bytes
        self._metrics = metrics
        self._on_stall = on_stall
        self._on_resume = on_resume
        self._on_link_change = on_link_change
        self.link = bsproto.Link(address, tube, self._link_changed)
        # Crossing a water mark wakes the owner like a stall ending: the server may
        # take work again, or must stop getting it.
        self.backlog = Backlog(address, tube, high_water, metrics, on_change=on_resume)
        self.stalled = False  # a command has been in flight for the stall bound
        self._stall_logged = False
        self.last_io = 0.0

    @property
    def connected(self) -> bool:
        return self.link.conn is not None

    @property
    def full(self) -> bool:
        """Above the high-water mark (or out of memory): put nothing more on it."""
        return self.backlog.full

    async def start(self, wait: float) -> None:
        self.backlog.start()
        await self.link.start(wait)

    async def close(self) -> None:
        await self.backlog.close()
        await self.link.close()

    def drop(self, reason: object) -> None:
        self.link.drop(self.link.conn, reason)

    # Packing ----------------------------------------------------------------------------

    def ranges(self, sizes: list[int]) -> list[tuple[int, int]]:
        """Cut a run of encoded events (their sizes) into jobs under the size limit."""
        return codec.job_ranges(sizes, self.job_bytes, MAX_EVENTS_PER_JOB)

    def _split(self, encoded: list[bytes]) -> list[list[bytes]]:
        pieces = [encoded[a:b] for a, b in self.ranges([len(e) for e in encoded])]
        if len(pieces) > 1:
            return pieces
        # The server refused what the limit we know allows: halve, so splitting ends.
        half = len(encoded) // 2
        return [encoded[:half], encoded[half:]]

    # Putting ----------------------------------------------------------------------------

    async def put_events(self, encoded: list[bytes], outcomes: list[Outcome]) -> None:
        """Put these events as one job, or as several if it is too big for the server.

        Appends one outcome per event, in order: QUEUED, or LOST for an event that is
        too big for any job on its own (skipped so it cannot take the others with it).
        Raises PutFailed at the first put that fails; the events from
        ``len(outcomes)`` on are then not stored.
        """
        body = codec.encode_job(encoded)
        # More than one event and over the limit: packed under a limit since lowered.
        if len(encoded) == 1 or len(body) <= self.job_bytes:
            try:
                await self._put_body(body, len(encoded))
                outcomes.extend([Outcome.QUEUED] * len(encoded))
                return
            except bsproto.JobTooBig:
                await self._learn_limit(len(body))
                if len(encoded) == 1:
                    log.error(kv("event_too_big", bytes=len(body), max_job_bytes=self.job_bytes))
                    outcomes.append(Outcome.LOST)
                    return
        for piece in self._split(encoded):
            await self.put_events(piece, outcomes)

    async def put_job(self, body: bytes) -> list[str]:
        """Put one job body as it is (a spooled one); returns the kinds of the events
        dropped as too big for any job.

        Raises PutFailed when the job is not (entirely) in beanstalkd. A body too big
        for the server is split into events and put again in smaller jobs."""
        if len(body) <= self.job_bytes:
            try:
                await self._put_body(body, codec.event_count(body) or 1)
                return []
            except bsproto.JobTooBig:
                await self._learn_limit(len(body))
        try:
            items = codec.decode_frame(body)
        except codec.CodecError as exc:
            # It can never be put: skip it (counted and logged) rather than let it block
            # every job behind it. (Counted under "open": its kinds are unknown.)
            log.error(kv("spool_record_dropped", reason=repr(exc), bytes=len(body)))
            return ["open"] * (codec.event_count(body) or 1)
        outcomes: list[Outcome] = []
        await self.put_events([orjson.dumps(item) for item in items], outcomes)
        dropped = [codec.item_kind(item) for item, outcome in zip(items, outcomes, strict=True)
                   if outcome is Outcome.LOST]  # fmt: skip
        if dropped:
            log.error(kv("spool_events_dropped", events=len(dropped), reason="event too big"))
        return dropped

    async def ping(self) -> None:
        """Check the connection (a failed ping drops it); the link reconnects."""
        conn = self.link.conn
        if conn is not None:
            await self._command(conn, conn.ping(self._tube))

    async def _learn_limit(self, refused: int) -> None:
        """JOB_TOO_BIG: the server's limit is lower than we knew (it was restarted with a
        smaller -z, or spooled jobs were packed for another server). Ask it."""
        limit = refused - 1
        conn = self.link.conn
        if conn is not None:
            limit = min(limit, await self._command(conn, conn.max_job_size()))
        limit = min(self._wanted_job_bytes, limit)
        if limit < self.job_bytes:
            log.warning(kv("max_job_size_lowered", max_job_bytes=limit))
            self.job_bytes = limit

    async def _put_body(self, body: bytes, events: int) -> None:
        conn = self.link.conn
        if conn is None:
            raise PutFailed("beanstalkd unreachable")
        started = time.perf_counter()
        try:
            await self._command(conn, conn.put(body, self._ttr))
        except bsproto.Buried:
            # The job *is* stored, buried; it is durable in the binlog and an operator
            # can kick it. Counted, since buried jobs also pin binlog files.
            self._metrics.buried_on_put.inc()
            log.error(kv("put_buried", events=events))
        except bsproto.Refused as exc:
            if "OUT_OF_MEMORY" in str(exc):
                self.backlog.out_of_memory()
            raise PutFailed(str(exc)) from None
        self.backlog.put(len(body))
        self._metrics.enqueue_duration.observe(time.perf_counter() - started)
        self._metrics.job_events.observe(events)

    async def _command(self, conn: bsproto.Connection, command: Coroutine[Any, Any, T]) -> T:
        """Run one command with the stall timer armed; a broken connection is dropped
        and reported as PutFailed."""
        stall = asyncio.get_running_loop().call_later(self._stall_s, self._stall)
        try:
            result = await command
        except bsproto.ConnectionLost as exc:
            self.link.drop(conn, exc)
            raise PutFailed(str(exc)) from None
        except asyncio.CancelledError:
            # Cancelled mid-command (a stop): its answer may still come and would be
            # read as the next command's, so nothing more may go over this connection.
            self.link.drop(conn, None)
            raise
        finally:
            stall.cancel()
            if self.stalled:
                self.stalled = False
                self._on_resume()
        self.last_io = time.monotonic()
        self._stall_logged = False
        return result

    def _stall(self) -> None:
        self.stalled = True
        if not self._stall_logged:
            self._stall_logged = True
            log.warning(kv("beanstalkd_stalled", server=self.server, in_flight_s=self._stall_s))
        self._on_stall()

    def _link_changed(self, up: bool) -> None:
        if up:
            self.job_bytes = min(self._wanted_job_bytes, self.link.max_job_size)
            self.last_io = time.monotonic()
        self._on_link_change(up)
