"""Durable enqueue: a request is answered only after its event is safe.

One enqueuer over the beanstalkd servers ``TRACKBUF_BEANSTALKD`` names: one server, or
several independent ones (beanstalkd has no clustering; large users scale it by giving
each client several servers and spreading jobs over them). One server is a pool of one.

Requests hand encoded events to the enqueuer and await a future. There is one delivery
*lane* per server (``lane.Lane``), each a task on the event loop, all taking from one
shared pending list: a lane that is free and whose server is healthy takes
*everything* that arrived while its previous put was in flight (natural batching),
puts the first job on its server and hands the rest back for the other lanes (or its
own next round). Under heavy load jobs fill up by themselves; at moderate rates a job's
first event waits up to ``TRACKBUF_JOB_LINGER_MS`` for others to join it (``linger``),
which makes for fewer, larger jobs at a cost of at most that wait.

So at most one put is in flight per server, a slow server delays only its own put, and
the spreading is *least-outstanding* by construction: only a lane with nothing
outstanding takes work, and idle lanes wait in line, so under light load jobs go round
the servers in turn. Against one task putting round-robin over the pool (one put in
flight in all), lanes answered about 30% more requests with a lower p99 when few
requesters waited; with many, the event loop was the limit and the two were alike
(docs/ARCHITECTURE.md, "The beanstalkd pool", has the figures). Each lane keeps a
running average of its server's round trip, and a server clearly slower than another
healthy one leaves the work to it; it pings now and then, and takes work again once it
is fast again.

The parts, one job each:

- ``putter``: the put path into beanstalkd (connection, stall timer, packing,
  splitting, learning the size limit), for live batches and replay alike.
- ``lane``: one server's health as the enqueuer sees it.
- ``spool_writer``: the local spool on its disk thread, for when no server can take a
  job (down, hung, out of memory, draining).
- ``replay``: the spool put back into beanstalkd between live batches, one round at a
  time on whichever healthy lane is idle.
- this module: the lanes' tasks that batch and answer requests, the stall handling,
  and the spooler that answers from the spool while no server may.

A server leaves rotation when it:

- drops the connection, or cannot be reached: its link reconnects in the background
  with backoff (``bsproto.Link``), and the server rejoins at the first connection;
- holds more than its high-water mark (``backlog``): no live jobs and no replay until
  the consumer has drained it below the low-water mark;
- refuses a put (DRAINING, OUT_OF_MEMORY): among several servers the lane rests for
  ``lane.REST_S``, doubling while refusals go on, and the refused events go to another
  server; a single server's refused events go to the spool, and the next batch asks it
  again;
- stalls: a command still in flight after the stall bound. With several servers that
  is ``POOL_STALL_S``, and the requests inside that put are handed back and put on
  another healthy server, so they are answered promptly rather than after the 2 s I/O
  timeout; the stalled put is not cancelled, and if the server answers it later the
  job is stored twice and the consumer drops the duplicate by ``event_id`` (counted in
  ``trackbuf_ingest_jobs_reput_total{reason="stall"}``). With one server (or no other
  healthy one) there is nowhere to hand them: the requests inside the put wait for its
  answer or its timeout (``bsproto.IO_TIMEOUT_S``), since spooling them too would store
  each event twice whenever the put succeeds late.

The spool is used only when no server may answer: each is down, resting, above its
high-water mark, or has had a command in flight for the single server's
``PUT_STALL_S`` (every server "stalled" at once for a moment is more often this host
short of CPU than every server hung). So a hung beanstalkd makes no request much slower
than ``PUT_STALL_S`` (plus a replay slice and the job linger: a spool record, like a
job, waits for more events), except those inside a stalled put.

Each lane runs its own commands (a put, a replay round, a ping): a task per put made
every batch wait two more turns of the event loop, and with 64 clients waiting on their
batches ingest sat idle 10% of the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from ingest import bsproto
from ingest.lane import SLOW_MARGIN_S, Lane
from ingest.linger import Linger
from ingest.metrics import IngestMetrics
from ingest.outcomes import Outcome
from ingest.putter import POOL_STALL_S, PUT_STALL_S, PutFailed, Putter
from ingest.replay import Replayer, replay_before_exit
from ingest.spool import Spool
from ingest.spool_writer import SpoolWriter
from trackbuf.log import kv
from trackbuf.settings import Settings

__all__ = ["Enqueuer", "Outcome"]

log = logging.getLogger("trackbuf.ingest.enqueue")

IDLE_CHECK_S = 0.5
PING_INTERVAL_S = 1.0

Pending = tuple[bytes, "asyncio.Future[Outcome]"]


class Enqueuer:
    """Puts events into one or more beanstalkd servers, or else the spool."""

    def __init__(
        self,
        addresses: Sequence[tuple[str, int]],
        tube: str,
        ttr: int,
        max_job_bytes: int,
        metrics: IngestMetrics,
        spool: Spool | None = None,
        linger_s: float = 0.0,
        queue_max_bytes: int = 1 << 62,
    ) -> None:
        if not addresses:
            raise ValueError("an enqueuer needs at least one beanstalkd server")
        self._metrics = metrics
        self._pending: list[Pending] = []
        self._linger = Linger(linger_s)
        self._wake = asyncio.Event()  # work for the lanes
        self._nudge = asyncio.Event()  # work for the spooler, or a server left rotation
        self._closing = False
        self._writer = SpoolWriter(spool, metrics)
        self._replaying = asyncio.Lock()  # one replay round at a time, on any lane
        # With other servers, a stalled put's requests and a refused put's events go to
        # one of them; alone, a server has only the spool to hand them to, and waits
        # the longer bound before using it (a disk write and a replay later).
        self._hand_on = len(addresses) > 1
        stall_s = POOL_STALL_S if self._hand_on else PUT_STALL_S
        self._lanes = [
            self._lane(a, tube, ttr, max_job_bytes, queue_max_bytes, stall_s) for a in addresses
        ]
        self._spooler: asyncio.Task[None] | None = None
        self._spooler_holds: list[Pending] = []
        for lane in self._lanes:
            # The series exists (at 0) from the start, as an unlabelled gauge would.
            metrics.beanstalkd_up.labels(lane.server).set(0)

    @classmethod
    def from_settings(
        cls, settings: Settings, metrics: IngestMetrics, spool: Spool | None
    ) -> Enqueuer:
        """The enqueuer of ingest and of ``trackbuf spool replay``, which puts a spool
        directory back through the same put path (high-water mark included)."""
        return cls(
            settings.beanstalkd_addresses, settings.tube, ttr=settings.job_ttr,
            max_job_bytes=settings.max_job_bytes, metrics=metrics, spool=spool,
            linger_s=settings.job_linger_ms / 1000, queue_max_bytes=settings.queue_max_bytes,
        )  # fmt: skip

    def _lane(
        self,
        address: tuple[str, int],
        tube: str,
        ttr: int,
        max_job_bytes: int,
        high_water: int,
        stall_s: float,
    ) -> Lane:
        lane: Lane
        putter = Putter(
            address, tube, ttr, max_job_bytes, self._metrics,
            on_stall=lambda: self._on_stall(lane), on_resume=lambda: self._changed(lane),
            on_link_change=lambda up: self._link_changed(lane, up), stall_s=stall_s,
            high_water=high_water,
        )  # fmt: skip
        replayer = Replayer(
            self._writer, putter, self._metrics,
            live_waiting=lambda: still_waiting(self._pending), come_back=self._wake.set,
        )  # fmt: skip
        lane = Lane(putter, replayer, stall_s)
        return lane

    @property
    def spool(self) -> Spool | None:
        return self._writer.spool

    @property
    def connected(self) -> bool:
        return any(lane.putter.connected for lane in self._lanes)

    @property
    def servers_up(self) -> list[str]:
        """The servers that take jobs now ("host:port")."""
        return [lane.server for lane in self._lanes if lane.healthy]

    async def start(self) -> None:
        await self._writer.open()
        # /readyz is right from the start, and a healthy beanstalkd takes the first
        # requests rather than the spool. All first attempts at once: a hung server
        # holds the start no longer than one.
        await asyncio.gather(
            *(lane.putter.start(wait=bsproto.CONNECT_TIMEOUT_S) for lane in self._lanes)
        )
        loop = asyncio.get_running_loop()
        for lane in self._lanes:
            lane.task = loop.create_task(self._run_lane(lane), name=f"enqueue {lane.server}")
        self._spooler = loop.create_task(self._run_spooler(), name="enqueue spooler")

    def submit(self, encoded: bytes) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        pending = self._pending
        pending.append((encoded, future))
        waiting = len(pending)
        self._linger.arrived(waiting)
        self._wake.set()
        # The first event of a batch tells the spooler when no server may take it. Later
        # ones need not: the spooler was told then, or by the server leaving rotation,
        # and it looks at the pending list again after each write.
        if waiting == 1 and not self._any_healthy():
            self._nudge.set()
        return future

    def ready(self) -> bool:
        """Can a request's event be made durable right now?"""
        return self._any_healthy() or self._writer.has_room(64 * 1024)

    async def close(self, timeout: float) -> bool:
        """Flush what is pending, then stop; True if that finished in time."""
        self._closing = True
        self._wake.set()
        self._nudge.set()
        deadline = time.monotonic() + timeout
        finished = True
        # Lanes and the spooler deliver what requests wait for; idle lanes (or one in a
        # replay round or a ping, which hold nobody) are simply cancelled below. The
        # spool keeps what a cancelled round had not put; the next start replays it.
        while self._holding_requests():
            if time.monotonic() >= deadline:
                finished = False
                break
            await asyncio.sleep(0.01)
        tasks = [lane.task for lane in self._lanes if lane.task is not None]
        if self._spooler is not None:
            tasks.append(self._spooler)
        for task in tasks:
            task.cancel()
        if tasks:
            # Cancelled tasks end at their next await; let them, so none is left pending.
            await asyncio.wait(tasks, timeout=0.1)
        await replay_before_exit(self._writer, [lane.replayer for lane in self._lanes], deadline)
        await asyncio.gather(*(lane.putter.close() for lane in self._lanes))
        await self._writer.close()
        return finished

    def _holding_requests(self) -> bool:
        return (
            still_waiting(self._pending)
            or still_waiting(self._spooler_holds)
            or any(still_waiting(lane.holds) for lane in self._lanes)
        )

    def _any_healthy(self) -> bool:
        return any(lane.healthy for lane in self._lanes)

    # The lanes ------------------------------------------------------------------------

    async def _run_lane(self, lane: Lane) -> None:
        while True:
            try:
                await self._step(lane)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A lane must outlive any bug: if it died, every later request would
                # wait for a future nobody settles.
                log.exception(kv("enqueue_loop_error", server=lane.server))
                lane.putter.drop("enqueue loop error")
                await asyncio.sleep(0.1)

    async def _step(self, lane: Lane) -> None:
        """One round of one lane: deliver a job, or wait for work or for its server."""
        lane.changed.clear()
        if not lane.healthy:
            wait = IDLE_CHECK_S
            if lane.putter.connected and not lane.putter.stalled and not lane.putter.full:
                wait = max(lane.rest_until - time.monotonic(), 0.001)  # resting
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await lane.changed.wait()
            return
        if not self._pending:
            try:
                async with asyncio.timeout(IDLE_CHECK_S):
                    await self._wake.wait()
            except TimeoutError:
                await self._idle(lane)
                return
            if not self._pending:  # woken to replay, to close, or another lane took it
                self._wake.clear()
                await self._replay_some(lane)
            return  # the next round checks the server again before taking work
        if self._hand_on and self._passed_over(lane):
            # A clearly faster server takes the work; this one waits for the next
            # arrival and measures itself now and then, so it returns once fast again.
            self._wake.clear()
            if time.monotonic() - lane.putter.last_io > PING_INTERVAL_S:
                await self._ping(lane)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_CHECK_S):
                    await self._wake.wait()
            return
        if not self._closing:
            # Free lanes may all linger on the same job; the first to end takes it.
            await self._linger.wait(len(self._pending))
            if not self._pending or not lane.healthy:
                return
        self._wake.clear()
        batch, self._pending = self._pending, []
        await self._deliver(lane, batch)
        await self._replay_some(lane)

    def _passed_over(self, lane: Lane) -> bool:
        """Is another healthy server so much faster that this one should leave it the
        work? (Least expected wait: a free lane takes work unless this holds.)"""
        limit = lane.rtt - SLOW_MARGIN_S
        return any(o.healthy and 2 * o.rtt < limit for o in self._lanes if o is not lane)

    async def _deliver(self, lane: Lane, batch: list[Pending]) -> None:
        ranges = lane.putter.ranges([len(item[0]) for item in batch])
        first, *rest = [batch[a:b] for a, b in ranges]
        if rest:
            # One job per round: the rest goes back to the head of the queue, for the
            # other lanes (or this one next), where the spooler finds it if this put
            # hangs.
            self._pending[:0] = [item for chunk in rest for item in chunk]
            self._wake.set()
        lane.holds = first
        try:
            await self._put_chunk(lane, first)
        finally:
            lane.holds = []

    async def _put_chunk(self, lane: Lane, chunk: list[Pending]) -> None:
        outcomes: list[Outcome] = []
        failure: str | None = None
        started = time.perf_counter()
        try:
            await lane.putter.put_events([item[0] for item in chunk], outcomes)
            lane.timed(time.perf_counter() - started)
        except PutFailed as exc:
            failure = str(exc)
        except Exception as exc:
            # Anything unexpected from the connection: drop it; the jobs go elsewhere.
            log.exception(kv("enqueue_crashed", server=lane.server, events=len(chunk)))
            lane.putter.drop(repr(exc))
            failure = repr(exc)
        # Puts go in order: the events before len(outcomes) are settled (queued, or lost
        # as too big for any job), the rest is not stored by this server.
        settle(chunk[: len(outcomes)], outcomes)
        if lane.holds is not chunk:
            return  # handed to another server at the stall; a late success is a duplicate
        if failure is None:
            lane.accepted()
            self._writer.outage_over()
            return
        left = chunk[len(outcomes) :]
        if not self._hand_on:
            # Nowhere else to put them: the spool, now (a duplicate, if this put was
            # stored after all, is dropped by the consumer). No rest: the next batch
            # asks the server again.
            if left:
                await self._spool_chunk(left, failure)
            return
        reason = "connection"
        if lane.putter.connected:
            reason = "refused"
            lane.rest()
            self._nudge.set()
        if left:
            self._reput(lane, left, reason, failure)

    def _reput(self, lane: Lane, chunk: list[Pending], reason: str, error: str) -> None:
        """Hand the requests of a put that failed on this lane back to the others."""
        self._metrics.reputs.labels(reason).inc()
        log.warning(
            kv("put_handed_on", server=lane.server, reason=reason, error=error, events=len(chunk))
        )
        self._pending[:0] = chunk
        self._wake.set()
        self._nudge.set()

    # A hung beanstalkd ------------------------------------------------------------------

    def _on_stall(self, lane: Lane) -> None:
        """A command of this lane has been in flight for its stall bound."""
        lane.stalled_at = time.monotonic()
        chunk = lane.holds
        if chunk and still_waiting(chunk) and any(o.healthy for o in self._lanes if o is not lane):
            lane.holds = []
            self._reput(lane, chunk, "stall", f"no answer in {lane.stall_s} s")
        # Without another healthy server the requests wait for this put: spooling them
        # too would store each event twice on success. What arrives meanwhile goes to
        # the spool once no server may answer (the spooler).
        self._nudge.set()

    def _changed(self, lane: Lane) -> None:
        lane.changed.set()
        self._wake.set()
        self._nudge.set()

    def _link_changed(self, lane: Lane, up: bool) -> None:
        self._metrics.beanstalkd_up.labels(lane.server).set(1 if up else 0)
        self._metrics.beanstalkd_servers_up.set(sum(o.putter.connected for o in self._lanes))
        if up:
            lane.accepted()
            lane.rtt = 0.0  # measured afresh
        self._changed(lane)  # if up, the spool may have something to replay

    # Idle time and replay -------------------------------------------------------------

    async def _idle(self, lane: Lane) -> None:
        # Without traffic a dead server or connection goes unnoticed until the next
        # put: check it now and then, so readiness is honest and the spool can drain.
        if time.monotonic() - lane.putter.last_io > PING_INTERVAL_S:
            await self._ping(lane)
            return
        await self._replay_some(lane)

    async def _ping(self, lane: Lane) -> None:
        started = time.perf_counter()
        with contextlib.suppress(PutFailed):  # a failed ping has dropped the connection
            await lane.putter.ping()
            lane.timed(time.perf_counter() - started)

    async def _replay_some(self, lane: Lane) -> None:
        # An empty spool is the usual case, after every live batch: no lock for it.
        if self._writer.empty or self._closing or self._replaying.locked() or not lane.healthy:
            return
        async with self._replaying:
            await lane.replayer.round()

    # No server may answer: the spool ----------------------------------------------------

    async def _run_spooler(self) -> None:
        """Answer from the spool while no server may: each down, resting, full, or
        stalled for PUT_STALL_S."""
        while True:
            try:
                await self._spooler_round()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Like a lane, the spooler must outlive any bug: if it died, no later
                # outage would be answered from the spool, and /readyz, which sees spool
                # room, would still say ready.
                log.exception(kv("enqueue_spooler_error"))
                await asyncio.sleep(0.1)

    async def _spooler_round(self) -> None:
        wait = self._spool_wait() if self._pending else IDLE_CHECK_S
        if wait is None and not self._closing:
            # A spool record is a job too: its first event waits for others, as a
            # put's would (at most the job linger).
            await self._linger.wait(len(self._pending))
            wait = self._spool_wait() if self._pending else IDLE_CHECK_S
        if wait is None:
            batch, self._pending = self._pending, []
            self._spooler_holds = batch  # a stop waits for these, not an idle spooler
            try:
                reason = self._why_spool()
                for chunk in self._pack(batch):
                    await self._spool_chunk(chunk, reason)
            except Exception:
                # A request whose future nobody settles waits forever: answer what this
                # round took and did not settle, with the loss counted and logged.
                log.exception(kv("spool_round_crashed", events=len(batch)))
                settle(batch, [Outcome.LOST] * len(batch))  # skips the settled ones
                raise
            finally:
                self._spooler_holds = []
            return
        self._nudge.clear()
        # The lanes and submit() set the event on every change that matters, and
        # this task looks at the pending list itself before waiting, so clearing it
        # here cannot make it miss work.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(wait, IDLE_CHECK_S)):
                await self._nudge.wait()

    def _spool_wait(self) -> float | None:
        """None when the spool must answer now (no server may answer); otherwise how
        long the spooler may sleep before it looks again."""
        now = time.monotonic()
        waits = [
            lane.stall_grace(now) if lane.putter.stalled else IDLE_CHECK_S
            for lane in self._lanes if lane.may_answer(now)
        ]  # fmt: skip
        return min(waits, default=None)

    def _why_spool(self) -> str:
        connected = [lane.putter for lane in self._lanes if lane.putter.connected]
        if any(putter.full for putter in connected):
            return "beanstalkd above its high-water mark"
        if any(putter.stalled for putter in connected):
            return "beanstalkd hung"
        if connected:
            return "beanstalkd refused puts"
        return "beanstalkd unreachable"

    def _pack(self, batch: list[Pending]) -> list[list[Pending]]:
        """Spool records the size of jobs, so replay puts each as it is: cut under the
        smallest job limit of the servers."""
        putter = min((lane.putter for lane in self._lanes), key=lambda p: p.job_bytes)
        return [batch[a:b] for a, b in putter.ranges([len(item[0]) for item in batch])]

    async def _spool_chunk(self, chunk: list[Pending], reason: str) -> None:
        try:
            outcomes = await self._writer.write([item[0] for item in chunk], reason)
        except Exception:
            # A request whose future nobody settles waits forever (ingest sets no
            # timeout of its own): answer it, with the loss counted and logged.
            log.exception(kv("spool_write_crashed", events=len(chunk)))
            outcomes = [Outcome.LOST] * len(chunk)
        settle(chunk, outcomes)


def still_waiting(items: list[Pending]) -> bool:
    """Does any request still wait on these? (aiohttp cancels a request whose client
    hung up, and with it the future.)"""
    return any(not future.done() for _, future in items)


def settle(chunk: list[Pending], outcomes: list[Outcome]) -> None:
    for (_, future), outcome in zip(chunk, outcomes, strict=True):
        if not future.done():  # a client that hung up cancelled its request
            future.set_result(outcome)
