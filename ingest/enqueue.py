"""Durable enqueue: a request is answered only after its event is safe.

Requests hand encoded events to one task on the event loop and await a future. The
task takes *everything* that arrived while the previous put was in flight and sends
it as one job: natural batching. (What does not fit under the job-size limit goes
first in the next round.) Under heavy load jobs fill up by themselves; at moderate
rates a job's first event waits up to ``TRACKBUF_JOB_LINGER_MS`` for others to join it
(``linger``), which makes for fewer, larger jobs at a cost of at most that wait.

The parts, one job each:

- ``putter``: the put path into beanstalkd (connection, stall timer, packing,
  splitting, learning the size limit), for live batches and replay alike.
- ``spool_writer``: the local spool on its disk thread, for when a put cannot be done
  (beanstalkd down, hung, out of memory, draining).
- ``replay``: the spool put back into beanstalkd between live batches.
- this module: the enqueue task that batches and answers requests, and the stall
  spooler, for one beanstalkd server. (``pool``: the same over several servers.)

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
import logging
import time

from ingest import bsproto
from ingest.linger import Linger
from ingest.metrics import IngestMetrics
from ingest.outcomes import Outcome
from ingest.putter import PUT_STALL_S, PutFailed, Putter
from ingest.replay import Replayer, replay_before_exit
from ingest.spool import Spool
from ingest.spool_writer import SpoolWriter
from trackbuf.log import kv

__all__ = ["Enqueuer", "Outcome"]

log = logging.getLogger("trackbuf.ingest.enqueue")

IDLE_CHECK_S = 0.5
PING_INTERVAL_S = 1.0

Pending = tuple[bytes, "asyncio.Future[Outcome]"]


class Enqueuer:
    def __init__(
        self,
        address: tuple[str, int],
        tube: str,
        ttr: int,
        max_job_bytes: int,
        metrics: IngestMetrics,
        spool: Spool | None = None,
        linger_s: float = 0.0,
        queue_max_bytes: int = 1 << 62,
    ) -> None:
        self._metrics = metrics
        self._pending: list[Pending] = []
        self._wake = asyncio.Event()
        self._linger = Linger(linger_s)
        self._closing = False
        self._putter = Putter(
            address, tube, ttr, max_job_bytes, metrics,
            on_stall=self._on_stall, on_resume=self._wake.set, on_link_change=self._link_changed,
            high_water=queue_max_bytes,
        )  # fmt: skip
        # The series exists (at 0) from the start, as an unlabelled gauge would.
        metrics.beanstalkd_up.labels(self._putter.server).set(0)
        self._writer = SpoolWriter(spool, metrics)
        self._replayer = Replayer(
            self._writer, self._putter, metrics,
            live_waiting=lambda: still_waiting(self._pending), come_back=self._wake.set,
        )  # fmt: skip
        # Whether the enqueue task is delivering a batch that requests wait for (a replay
        # round or a ping holds nobody, so a stop need not wait for one).
        self._holding_requests = False
        # A command has been in flight for PUT_STALL_S: _spool_while_stalled answers
        # meanwhile.
        self._stall_spooler: asyncio.Task[None] | None = None
        self._spooler_holds: list[Pending] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def spool(self) -> Spool | None:
        return self._writer.spool

    @property
    def connected(self) -> bool:
        return self._putter.connected

    async def start(self) -> None:
        await self._writer.open()
        # /readyz is right from the start, and a healthy beanstalkd takes the first
        # requests rather than the spool.
        await self._putter.start(wait=bsproto.CONNECT_TIMEOUT_S)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="enqueue")

    def submit(self, encoded: bytes) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending.append((encoded, future))
        self._linger.arrived(len(self._pending))
        self._wake.set()
        return future

    def ready(self) -> bool:
        """Can a request's event be made durable right now?"""
        return self.connected or self._writer.has_room(64 * 1024)

    async def close(self, timeout: float) -> bool:
        """Flush what is pending, then stop; True if that finished in time."""
        self._closing = True
        self._wake.set()
        finished = True
        deadline = time.monotonic() + timeout
        if self._task is not None:
            if not self._holding_requests and not still_waiting(self._pending):
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
        if spooler is not None and still_waiting(self._spooler_holds):
            # Requests wait for the spool write it is in; an idle spooler is just cancelled.
            done, _ = await asyncio.wait([spooler], timeout=max(deadline - time.monotonic(), 0))
            finished = finished and bool(done)
        tasks = [t for t in (self._task, self._stall_spooler) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            # Cancelled tasks end at their next await; let them, so none is left pending.
            await asyncio.wait(tasks, timeout=0.1)
        await replay_before_exit(self._writer, [self._replayer], deadline)
        await self._putter.close()
        await self._writer.close()
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
                self._putter.drop("enqueue loop error")
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
        if not self._closing:
            await self._linger.wait(len(self._pending))
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
            if not self.connected:
                await self._spool_chunk(first, "beanstalkd unreachable")
            elif self._putter.full:
                # Above the high-water mark: disk takes the overflow, in order, until
                # the consumer has drained the server below the low-water mark.
                await self._spool_chunk(first, "beanstalkd above its high-water mark")
            else:
                await self._put_chunk(first)
        finally:
            self._holding_requests = False

    def _pack(self, batch: list[Pending]) -> list[list[Pending]]:
        return [batch[a:b] for a, b in self._putter.ranges([len(item[0]) for item in batch])]

    async def _put_chunk(self, chunk: list[Pending]) -> None:
        encoded = [item[0] for item in chunk]
        try:
            outcomes = await self._store(encoded)
        except Exception:
            # A bug must not leave requests waiting forever, nor hide the loss.
            log.exception(kv("enqueue_crashed", events=len(encoded)))
            self._putter.drop("enqueue crashed")
            outcomes = [Outcome.LOST] * len(chunk)
        settle(chunk, outcomes)

    async def _spool_chunk(self, chunk: list[Pending], reason: str) -> None:
        try:
            outcomes = await self._writer.write([item[0] for item in chunk], reason)
        except Exception:
            # A request whose future nobody settles waits forever (ingest sets no
            # timeout of its own): answer it, with the loss counted and logged.
            log.exception(kv("spool_write_crashed", events=len(chunk)))
            outcomes = [Outcome.LOST] * len(chunk)
        settle(chunk, outcomes)

    async def _store(self, encoded: list[bytes]) -> list[Outcome]:
        """Put these events into beanstalkd, or else the spool: one outcome per event."""
        outcomes: list[Outcome] = []
        try:
            await self._putter.put_events(encoded, outcomes)
        except Exception as exc:
            # PutFailed, or anything unexpected from the connection: the spool is the
            # safe place either way (a duplicate is dropped by the consumer).
            reason = str(exc) if isinstance(exc, PutFailed) else repr(exc)
            if not isinstance(exc, PutFailed):
                self._putter.drop(reason)
        else:
            self._writer.outage_over()
            return outcomes
        # Puts go in order, so the events before len(outcomes) are settled (queued, or
        # lost as too big) and only the rest goes to the spool.
        rest = encoded[len(outcomes) :]
        if not rest:
            return outcomes
        return outcomes + await self._writer.write(rest, reason)

    # A hung beanstalkd ------------------------------------------------------------------

    def _on_stall(self) -> None:
        """A command has been in flight for PUT_STALL_S (the putter's stall timer)."""
        if self._stall_spooler is None or self._stall_spooler.done():
            self._stall_spooler = asyncio.get_running_loop().create_task(
                self._spool_while_stalled(), name="stall-spooler"
            )

    async def _spool_while_stalled(self) -> None:
        """Answer from the spool what arrives while the enqueue task waits on a hung
        command, until that command ends (answered, or timed out and dropped)."""
        while self._putter.stalled:
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

    # Idle time and replay ---------------------------------------------------------------

    def _link_changed(self, up: bool) -> None:
        self._metrics.beanstalkd_up.labels(self._putter.server).set(1 if up else 0)
        self._metrics.beanstalkd_servers_up.set(1 if up else 0)
        if up:
            self._wake.set()  # the spool may have something to replay

    async def _idle(self) -> None:
        # Without traffic, a dead server or connection goes unnoticed until the next
        # put: check now and then, so readiness is honest and the spool can drain.
        if not self.connected:
            return
        if time.monotonic() - self._putter.last_io > PING_INTERVAL_S:
            with contextlib.suppress(PutFailed):  # a failed ping has dropped the connection
                await self._putter.ping()
            return
        await self._replay_some()

    async def _replay_some(self) -> None:
        if not self._closing:
            await self._replayer.round()


def still_waiting(items: list[Pending]) -> bool:
    """Does any request still wait on these? (aiohttp cancels a request whose client
    hung up, and with it the future.)"""
    return any(not future.done() for _, future in items)


def settle(chunk: list[Pending], outcomes: list[Outcome]) -> None:
    for (_, future), outcome in zip(chunk, outcomes, strict=True):
        if not future.done():  # a client that hung up cancelled its request
            future.set_result(outcome)
