"""Durable enqueue: a request is answered only after its event is safe.

Requests hand encoded events to one task on the event loop and await a future. The
task takes *everything* that arrived while the previous put was in flight and sends
it as one job: natural batching. (What does not fit under the job-size limit goes
first in the next round.) Under light load a job carries one event and adds no wait;
under heavy load jobs fill up by themselves, so no fixed linger is needed (DESIGN.md
measured a fixed 2 ms linger at ~0.5x the bare handler).

When a put cannot be done (beanstalkd down, hung, out of memory, draining), the job
goes to the local spool (on a disk thread, so an fsync never stalls the loop), and
the spool is replayed into beanstalkd between live batches once it takes puts again;
while requests wait, a replay round yields after ``REPLAY_SLICE_S``.

A hung beanstalkd must not make requests slow: no request waits for it much longer
than ``PUT_STALL_S`` (plus a replay slice), except those in the one put in flight
when it hung:

- Connecting happens in the background (``bsproto.Link``), with backoff after
  timeouts. While there is no connection, batches go straight to the spool.
- The enqueue task runs each command (a put, a replay round, a ping) itself: a task
  per put made every batch wait two more turns of the event loop, and with 64 clients
  waiting on their batches ingest sat idle 10% of the time. A timer armed for each
  command fires only if it is still in flight after ``PUT_STALL_S``: a helper task
  then answers whatever arrives from the spool until the command ends. The requests
  inside that one put still wait for its answer or its timeout
  (``bsproto.IO_TIMEOUT_S``): they were handed to beanstalkd, and spooling them too
  would store each of their events twice whenever the put succeeds late.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson

from ingest import bsproto
from ingest.metrics import IngestMetrics
from ingest.spool import Spool
from trackbuf import codec
from trackbuf.events import KINDS
from trackbuf.log import kv

log = logging.getLogger("trackbuf.ingest.enqueue")

# A healthy put answers within a millisecond (DESIGN.md: ~15k puts/s, ~3.4k/s fsyncing
# each with -f 0); one this slow means beanstalkd is hung, and later batches stop
# waiting for it. Set too low it only sends batches to the spool early, never loses one.
PUT_STALL_S = 0.25
MAX_EVENTS_PER_JOB = 1000
IDLE_CHECK_S = 0.5
PING_INTERVAL_S = 1.0
# A spool write that takes longer than this (a hung disk) counts as failed, so requests
# are answered (the event counted lost) instead of waiting on the disk.
SPOOL_TIMEOUT_S = 5.0
# Spooled jobs replayed between two live batches: enough to drain a spool quickly. Once
# live requests wait, a round stops after REPLAY_SLICE_S (one job at least, so a spool
# drains even under steady traffic): they wait for at most that and one put.
REPLAY_CHUNK = 64
REPLAY_SLICE_S = 0.02


class Outcome(enum.Enum):
    QUEUED = "queued"  # beanstalkd answered INSERTED (or BURIED: stored, needs a kick)
    SPOOLED = "spooled"  # appended to the local spool; replayed later
    LOST = "lost"  # neither worked; counted and logged


class PutFailed(Exception):
    """The job was not stored by beanstalkd; the message says why."""


Pending = tuple[bytes, "asyncio.Future[Outcome]"]
T = TypeVar("T")


class Enqueuer:
    def __init__(
        self,
        address: tuple[str, int],
        tube: str,
        ttr: int,
        max_job_bytes: int,
        metrics: IngestMetrics,
        spool: Spool | None = None,
    ) -> None:
        self._tube = tube
        self._ttr = ttr
        self._wanted_job_bytes = max_job_bytes
        self._job_bytes = max_job_bytes
        self._metrics = metrics
        self.spool = spool
        self._pending: list[Pending] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._link = bsproto.Link(address, tube, self._link_changed)
        # Whether the enqueue task is delivering a batch that requests wait for (a replay
        # round or a ping holds nobody, so a stop need not wait for one).
        self._holding_requests = False
        # A command has been in flight for PUT_STALL_S; _stall_spooler answers meanwhile.
        self._stalled = False
        self._stall_spooler: asyncio.Task[None] | None = None
        self._spooler_holds: list[Pending] = []
        self._stall_logged = False
        self._last_io = 0.0
        self._spooling = False
        self._spool_lost_counted = 0
        self._task: asyncio.Task[None] | None = None
        # One thread for spool I/O keeps appends in order and fsyncs off the loop.
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")

    @property
    def connected(self) -> bool:
        return self._link.conn is not None

    async def start(self) -> None:
        if self.spool is not None:
            await self._on_disk(self.spool.open)
            self._spool_gauges()
        # /readyz is right from the start, and a healthy beanstalkd takes the first
        # requests rather than the spool.
        await self._link.start(wait=bsproto.CONNECT_TIMEOUT_S)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="enqueue")

    def submit(self, encoded: bytes) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending.append((encoded, future))
        self._wake.set()
        return future

    def ready(self) -> bool:
        """Can a request's event be made durable right now?"""
        return self.connected or (self.spool is not None and self.spool.has_room(64 * 1024))

    async def close(self, timeout: float) -> bool:
        """Flush what is pending, then stop; True if that finished in time."""
        self._closing = True
        self._wake.set()
        finished = True
        deadline = time.monotonic() + timeout
        if self._task is not None:
            if not self._holding_requests and not _waiting(self._pending):
                # Idle, or in a replay round or a ping, which may hang: nobody waits for
                # them. The spool keeps what a round had not put; the next start replays it.
                self._task.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                finished = False
            except asyncio.CancelledError:
                pass  # the task was cancelled above; this coroutine was not
        spooler = self._stall_spooler
        if spooler is not None and _waiting(self._spooler_holds):
            # Requests wait for the spool write it is in; an idle spooler is just cancelled.
            done, _ = await asyncio.wait([spooler], timeout=max(deadline - time.monotonic(), 0))
            finished = finished and bool(done)
        tasks = [t for t in (self._task, self._stall_spooler) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            # Cancelled tasks end at their next await; let them, so none is left pending.
            await asyncio.wait(tasks, timeout=0.1)
        await self._link.close()
        if self.spool is not None:
            await self._on_disk(self.spool.close)
        # A disk thread stuck in fsync must not hold the process at exit.
        self._disk.shutdown(wait=False)
        return finished

    # The enqueue task -----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                if await self._step():
                    return
            except asyncio.CancelledError:
                raise
            except Exception:
                # This task must outlive any bug: if it died, every later request
                # would wait for a future nobody settles.
                log.exception(kv("enqueue_loop_error"))
                self._link.drop(self._link.conn, "enqueue loop error")
                await asyncio.sleep(0.1)

    async def _step(self) -> bool:
        """One round: deliver what is pending, or idle; True when closed and flushed."""
        if not self._pending:
            if self._closing:
                return True
            try:
                async with asyncio.timeout(IDLE_CHECK_S):
                    await self._wake.wait()
            except TimeoutError:
                await self._idle()
                return False
            if not self._pending:  # woken to replay, or to close
                self._wake.clear()
                await self._replay_some()
                return False
        self._wake.clear()
        batch, self._pending = self._pending, []
        await self._deliver(batch)
        await self._replay_some()
        return False

    async def _deliver(self, batch: list[Pending]) -> None:
        first, *rest = self._pack(batch)
        if rest:
            # One job per round: the rest goes back to the head of the queue, where the
            # stall spooler finds it if this put hangs (here it would wait for the put).
            self._pending[:0] = [item for chunk in rest for item in chunk]
            self._wake.set()
        self._holding_requests = True
        try:
            if self.connected:
                await self._put_chunk(first)
            else:
                await self._spool_chunk(first, "beanstalkd unreachable")
        finally:
            self._holding_requests = False

    async def _spool_chunk(self, chunk: list[Pending], reason: str) -> None:
        try:
            outcome = await self._spool_events([item[0] for item in chunk], reason)
        except Exception:
            # A request whose future nobody settles waits forever (ingest sets no
            # timeout of its own): answer it, with the loss counted and logged.
            log.exception(kv("spool_write_crashed", events=len(chunk)))
            outcome = Outcome.LOST
        _settle(chunk, [outcome] * len(chunk))

    def _on_stall(self) -> None:
        """A command has been in flight for PUT_STALL_S (a timer set by _command)."""
        self._stalled = True
        if not self._stall_logged:
            self._stall_logged = True
            log.warning(kv("beanstalkd_stalled", in_flight_s=PUT_STALL_S))
        if self._stall_spooler is None or self._stall_spooler.done():
            self._stall_spooler = asyncio.get_running_loop().create_task(
                self._spool_while_stalled(), name="stall-spooler"
            )

    async def _spool_while_stalled(self) -> None:
        """Answer from the spool what arrives while the enqueue task waits on a hung
        command, until that command ends (answered, or timed out and dropped)."""
        while self._stalled:
            if not self._pending:
                self._wake.clear()
                # The enqueue task checks _pending itself before it waits, so clearing
                # the event here cannot make it miss work.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PUT_STALL_S):
                        await self._wake.wait()
                continue
            batch, self._pending = self._pending, []
            self._spooler_holds = batch  # a stop waits for these, not for an idle spooler
            try:
                for chunk in self._pack(batch):
                    await self._spool_chunk(chunk, "beanstalkd hung")
            finally:
                self._spooler_holds = []

    async def _put_chunk(self, chunk: list[Pending]) -> None:
        encoded = [item[0] for item in chunk]
        try:
            outcomes = await self._store(encoded)
        except Exception:
            # A bug must not leave requests waiting forever, nor hide the loss.
            log.exception(kv("enqueue_crashed", events=len(encoded)))
            self._link.drop(self._link.conn, "enqueue crashed")
            outcomes = [Outcome.LOST] * len(chunk)
        _settle(chunk, outcomes)

    def _ranges(self, sizes: list[int]) -> list[tuple[int, int]]:
        """Cut a run of encoded events into jobs that stay under the job-size limit."""
        budget = self._job_bytes - codec.FRAME_BYTES
        ranges: list[tuple[int, int]] = []
        start = size = 0
        for i, nbytes in enumerate(sizes):
            cost = nbytes + 1
            if i > start and (size + cost > budget or i - start >= MAX_EVENTS_PER_JOB):
                ranges.append((start, i))
                start, size = i, 0
            size += cost
        if start < len(sizes):
            ranges.append((start, len(sizes)))
        return ranges

    def _pack(self, batch: list[Pending]) -> list[list[Pending]]:
        return [batch[a:b] for a, b in self._ranges([len(item[0]) for item in batch])]

    def _split(self, encoded: list[bytes]) -> list[list[bytes]]:
        pieces = [encoded[a:b] for a, b in self._ranges([len(e) for e in encoded])]
        if len(pieces) > 1:
            return pieces
        # The server refused what the limit we know allows: halve, so splitting ends.
        half = len(encoded) // 2
        return [encoded[:half], encoded[half:]]

    async def _store(self, encoded: list[bytes]) -> list[Outcome]:
        """Put these events into beanstalkd, or else the spool: one outcome per event."""
        outcomes: list[Outcome] = []
        try:
            await self._put_events(encoded, outcomes)
        except Exception as exc:
            # PutFailed, or anything unexpected from the connection: the spool is the
            # safe place either way (a duplicate is dropped by the consumer).
            reason = str(exc) if isinstance(exc, PutFailed) else repr(exc)
            if not isinstance(exc, PutFailed):
                self._link.drop(self._link.conn, reason)
        else:
            if self._spooling:
                self._spooling = False
                log.info(kv("spooling_stopped"))
            return outcomes
        # Puts go in order, so the events before len(outcomes) are settled (queued, or
        # lost as too big) and only the rest goes to the spool.
        rest = encoded[len(outcomes) :]
        if not rest:
            return outcomes
        return outcomes + [await self._spool_events(rest, reason)] * len(rest)

    async def _spool_events(self, encoded: list[bytes], reason: str) -> Outcome:
        if not self._spooling:
            # Once per outage, not once per event: an outage must not flood the log.
            self._spooling = True
            log.warning(kv("spooling_started", reason=reason))
        body = codec.encode_job(encoded)
        if self.spool is not None and await self._spool_append(body):
            self._spool_gauges()
            return Outcome.SPOOLED
        log.error(kv("enqueue_failed", reason=reason, events=len(encoded), spool="full"))
        return Outcome.LOST

    async def _put_events(self, encoded: list[bytes], outcomes: list[Outcome]) -> None:
        """Put these events as one job, or as several if it is too big for the server.

        Appends one outcome per event, in order: QUEUED, or LOST for an event that is
        too big for any job on its own (skipped so it cannot take the others with it).
        Raises PutFailed at the first put that fails; the events from
        ``len(outcomes)`` on are then not stored.
        """
        body = codec.encode_job(encoded)
        # More than one event and over the limit: packed under a limit since lowered.
        if len(encoded) == 1 or len(body) <= self._job_bytes:
            try:
                await self._put_body(body, len(encoded))
                outcomes.extend([Outcome.QUEUED] * len(encoded))
                return
            except bsproto.JobTooBig:
                await self._learn_limit(len(body))
                if len(encoded) == 1:
                    log.error(kv("event_too_big", bytes=len(body), max_job_bytes=self._job_bytes))
                    outcomes.append(Outcome.LOST)
                    return
        for piece in self._split(encoded):
            await self._put_events(piece, outcomes)

    async def _learn_limit(self, refused: int) -> None:
        """JOB_TOO_BIG: the server's limit is lower than we knew (it was restarted with a
        smaller -z, or spooled jobs were packed for another server). Ask it."""
        limit = refused - 1
        conn = self._link.conn
        if conn is not None:
            limit = min(limit, await self._command(conn, conn.max_job_size()))
        limit = min(self._wanted_job_bytes, limit)
        if limit < self._job_bytes:
            log.warning(kv("max_job_size_lowered", max_job_bytes=limit))
            self._job_bytes = limit

    async def _put_body(self, body: bytes, events: int) -> None:
        conn = self._link.conn
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
            raise PutFailed(str(exc)) from None
        self._metrics.enqueue_duration.observe(time.perf_counter() - started)
        self._metrics.job_events.observe(events)

    async def _command(self, conn: bsproto.Connection, command: Coroutine[Any, Any, T]) -> T:
        """Run one command on the connection, with the stall timer armed (see the module
        docstring); a broken connection is dropped and reported as PutFailed."""
        stall = asyncio.get_running_loop().call_later(PUT_STALL_S, self._on_stall)
        try:
            result = await command
        except bsproto.ConnectionLost as exc:
            self._link.drop(conn, exc)
            raise PutFailed(str(exc)) from None
        finally:
            stall.cancel()
            if self._stalled:
                self._stalled = False
                self._wake.set()  # the stall spooler stops; the enqueue task carries on
        self._last_io = time.monotonic()
        self._stall_logged = False
        return result

    def _link_changed(self, up: bool) -> None:
        self._metrics.beanstalkd_up.set(1 if up else 0)
        if up:
            self._job_bytes = min(self._wanted_job_bytes, self._link.max_job_size)
            self._last_io = time.monotonic()
            self._wake.set()  # the spool may have something to replay

    async def _idle(self) -> None:
        # Without traffic, a dead server or connection goes unnoticed until the next
        # put: check now and then, so readiness is honest and the spool can drain.
        conn = self._link.conn
        if conn is None:
            return
        if time.monotonic() - self._last_io > PING_INTERVAL_S:
            with contextlib.suppress(PutFailed):  # a failed ping has dropped the connection
                await self._command(conn, conn.ping(self._tube))
            return
        await self._replay_some()

    # Spool ------------------------------------------------------------------------------

    async def _replay_some(self) -> None:
        spool = self.spool
        if spool is None or spool.empty or self._closing or not self.connected:
            return
        await self._replay_round(spool)

    async def _replay_round(self, spool: Spool) -> None:
        replayed = 0
        started = time.monotonic()
        try:
            for _ in range(REPLAY_CHUNK):
                late = time.monotonic() - started > REPLAY_SLICE_S
                if replayed and late and _waiting(self._pending):
                    self._wake.set()  # the rest after the live batch
                    break
                body = await self._on_disk(spool.peek)
                if body is None:
                    break
                try:
                    dropped = await self._replay_one(body)
                except PutFailed as exc:
                    log.warning(kv("spool_replay_paused", reason=exc))
                    return
                await self._on_disk(spool.replayed, body)
                replayed += 1
                self._metrics.spool_replayed.inc()
                for kind in dropped:
                    self._metrics.event_counter(kind, "lost").inc()
            else:
                self._wake.set()  # more to do: the next round comes right after live work
        except Exception:
            log.exception(kv("spool_replay_error"))
        finally:
            self._spool_gauges()
        if replayed and spool.empty:
            log.info(kv("spool_drained"))

    async def _replay_one(self, body: bytes) -> list[str]:
        """Put one spooled job; returns the kinds of the events dropped as too big.

        Raises PutFailed when the job is not (entirely) in beanstalkd: the record stays
        in the spool and is replayed again later (its duplicates are dropped by the
        consumer), so the drops are counted only once the record is done."""
        if len(body) <= self._job_bytes:
            try:
                await self._put_body(body, codec.event_count(body) or 1)
                return []
            except bsproto.JobTooBig:
                await self._learn_limit(len(body))
        try:
            items = codec.decode_frame(body)
        except codec.CodecError as exc:
            # It can never be put: skip it (counted and logged) rather than let it block
            # every record behind it. (Counted under "open": its kinds are unknown.)
            log.error(kv("spool_record_dropped", reason=repr(exc), bytes=len(body)))
            return ["open"] * (codec.event_count(body) or 1)
        outcomes: list[Outcome] = []
        await self._put_events([orjson.dumps(item) for item in items], outcomes)
        dropped = [_kind(item) for item, outcome in zip(items, outcomes, strict=True)
                   if outcome is Outcome.LOST]  # fmt: skip
        if dropped:
            log.error(kv("spool_events_dropped", events=len(dropped), reason="event too big"))
        return dropped

    def _spool_gauges(self) -> None:
        # Set where the spool changes, not at scrape time: with several ingest
        # processes a scrape reaches one process but reports all of them.
        if self.spool is not None:
            self._metrics.spool_bytes.set(self.spool.pending_bytes)
            self._metrics.spool_jobs.set(self.spool.pending_records)
            # Events in records the disk corrupted, which replay skipped. Counted under
            # "open": a corrupted record's kinds cannot be trusted.
            lost = self.spool.lost_events - self._spool_lost_counted
            if lost:
                self._spool_lost_counted += lost
                self._metrics.event_counter("open", "lost").inc(lost)

    async def _spool_append(self, body: bytes) -> bool:
        assert self.spool is not None
        try:
            async with asyncio.timeout(SPOOL_TIMEOUT_S):
                return await self._on_disk(self.spool.append, body)
        except TimeoutError:
            log.error(kv("spool_write_timeout", timeout_s=SPOOL_TIMEOUT_S))
            return False

    async def _on_disk(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._disk, fn, *args)


def _waiting(items: list[Pending]) -> bool:
    """Does any request still wait on these? (aiohttp cancels a request whose client
    hung up, and with it the future.)"""
    return any(not future.done() for _, future in items)


def _settle(chunk: list[Pending], outcomes: list[Outcome]) -> None:
    for (_, future), outcome in zip(chunk, outcomes, strict=True):
        if not future.done():  # a client that hung up cancelled its request
            future.set_result(outcome)


def _kind(item: object) -> str:
    kind = item.get("k") if isinstance(item, dict) else None
    return kind if isinstance(kind, str) and kind in KINDS else "open"
