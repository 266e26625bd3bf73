"""Durable enqueue over a pool of independent beanstalkd servers.

beanstalkd has no clustering: large users scale it by giving each client several
servers and spreading jobs over them. Ingest does the same when
``TRACKBUF_BEANSTALKD`` names more than one server. (With one server the
``enqueue.Enqueuer`` runs instead, unchanged: one task, natural batching, the stall
spooler.)

One delivery *lane* per server, all taking from one shared pending list: a lane that
is free and whose server is healthy takes everything pending (natural batching and
the linger, as with one server), puts the first job on its server and hands the rest
back for the other lanes. So at most one put is in flight per server, a slow server
delays only its own put, and the spreading is *least-outstanding* by construction:
only a lane with nothing outstanding takes work, and idle lanes wait in line, so under
light load jobs go round the servers in turn. Against one task putting round-robin
over the pool (one put in flight in all), lanes answered about 30% more requests with
a lower p99 when few requesters waited; with many, the event loop was the limit and
the two were alike; and a stalled server holds only its own lane's put, not every
request (docs/ARCHITECTURE.md, "The beanstalkd pool", has the figures).

Turn-taking alone would give a server behind a slow link every third job, and its
round trip to those requests. So each lane keeps a running average of its server's
round trip, and a server clearly slower than another healthy one (twice its round
trip plus ``SLOW_MARGIN_S``) leaves the work to it; it pings now and then, and takes
work again once it is fast again.

A server leaves rotation when it:

- drops the connection, or cannot be reached: its link reconnects in the background
  with backoff (``bsproto.Link``), and the server rejoins at the first connection;
- holds more than its high-water mark (``backlog``): no live jobs and no replay until
  the consumer has drained it below the low-water mark;
- refuses a put (DRAINING, OUT_OF_MEMORY): the lane rests for ``REST_S``, doubling to
  ``REST_MAX_S`` while refusals go on, then tries again with live traffic;
- stalls: a command still in flight after ``POOL_STALL_S``. The requests inside that
  put are handed back to the pool and put on another healthy server, so they are
  answered promptly rather than after the 2 s I/O timeout. The stalled put is not
  cancelled: if the server answers it later, the job is stored twice and the consumer
  drops the duplicate by ``event_id`` (counted in
  ``trackbuf_ingest_jobs_reput_total{reason="stall"}``). The server rejoins when the
  command ends with an answer; after a timeout its link reconnects with backoff.

The jobs of a failed put go back to the head of the pending list
(``trackbuf_ingest_jobs_reput_total``) and the next healthy lane takes them. The spool
is used only when no server of the pool accepts; spool replay runs on whichever healthy
lane is idle, one round at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ingest import bsproto
from ingest.enqueue import IDLE_CHECK_S, PING_INTERVAL_S, Pending, settle, still_waiting
from ingest.linger import Linger
from ingest.metrics import IngestMetrics
from ingest.outcomes import Outcome
from ingest.putter import PUT_STALL_S, PutFailed, Putter
from ingest.replay import Replayer, replay_before_exit
from ingest.spool import Spool
from ingest.spool_writer import SpoolWriter
from trackbuf.log import kv

__all__ = ["POOL_STALL_S", "PoolEnqueuer"]

log = logging.getLogger("trackbuf.ingest.enqueue")

# A put still unanswered after this goes to another server. Shorter than the single
# server's 0.25 s (putter.PUT_STALL_S) because here a stall costs only a re-put on a
# healthy server, not a trip to the spool, and the requests inside the stalled put wait
# exactly this long. A healthy put answers in about a millisecond, so 0.1 s still leaves
# room for a slower network or an fsyncing server; set too low it only makes duplicates
# the consumer drops.
POOL_STALL_S = 0.1
# A server that refused a put rests this long before it gets live traffic again,
# doubling while it keeps refusing (draining or out of memory lasts a while).
REST_S = 0.5
REST_MAX_S = 5.0
# A server whose round trip is more than twice another healthy server's plus this margin
# gets no live jobs while that one is there: waiting for the fast server's put in flight
# is quicker than one round trip to the slow one. The margin keeps servers a few
# milliseconds apart (the usual jitter) all in rotation.
SLOW_MARGIN_S = 0.005
RTT_WEIGHT = 0.2  # of the newest round trip in the running average


class _Lane:
    """One server of the pool: its put path, its replay, and what its put holds."""

    def __init__(self, putter: Putter, replayer: Replayer) -> None:
        self.putter = putter
        self.replayer = replayer
        self.server = putter.server
        # The requests in this lane's put; emptied when a stall hands them elsewhere.
        self.holds: list[Pending] = []
        self.rest_until = 0.0
        self.rest_s = REST_S
        self.changed = asyncio.Event()  # the server may have become usable again
        self.rtt = 0.0  # running average of this server's round trips, seconds
        self.stalled_at = 0.0  # when its command in flight was found stalled
        self.task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        """Connected, not stalled, not resting after a refusal, under its high water."""
        return (
            self.putter.connected
            and not self.putter.stalled
            and not self.putter.full
            and (not self.rest_until or time.monotonic() >= self.rest_until)
        )

    def may_answer(self, now: float) -> bool:
        """Connected and not resting, and not stalled for longer than a single server
        waits before spooling (PUT_STALL_S). Every server of the pool 'stalled' at once
        for a moment is more often this machine short of CPU than three hung servers:
        the spool waits for the single-server bound, as it would with one server."""
        if not self.putter.connected or (self.rest_until and now < self.rest_until):
            return False
        if self.putter.full:
            return False
        return not self.putter.stalled or now - self.stalled_at < PUT_STALL_S - POOL_STALL_S

    def rest(self) -> None:
        self.rest_until = time.monotonic() + self.rest_s
        self.rest_s = min(self.rest_s * 2, REST_MAX_S)

    def accepted(self) -> None:
        self.rest_until, self.rest_s = 0.0, REST_S

    def timed(self, seconds: float) -> None:
        # A command that stalled is a fault, handled as one; counted here it would keep
        # the server passed over long after it recovered.
        if seconds < POOL_STALL_S:
            self.rtt += RTT_WEIGHT * (seconds - self.rtt)


class PoolEnqueuer:
    """The ``Enqueuer`` interface over several beanstalkd servers."""

    def __init__(
        self,
        addresses: list[tuple[str, int]],
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
        self._linger = Linger(linger_s)
        self._wake = asyncio.Event()  # work for the lanes
        self._nudge = asyncio.Event()  # work for the spooler, or a server left rotation
        self._closing = False
        self._writer = SpoolWriter(spool, metrics)
        self._replaying = asyncio.Lock()  # one replay round at a time, on any lane
        self._high_water = queue_max_bytes
        self._lanes = [self._lane(a, tube, ttr, max_job_bytes) for a in addresses]
        self._spooler: asyncio.Task[None] | None = None
        self._spooler_holds: list[Pending] = []
        for lane in self._lanes:
            metrics.beanstalkd_up.labels(lane.server).set(0)

    def _lane(self, address: tuple[str, int], tube: str, ttr: int, max_job_bytes: int) -> _Lane:
        lane: _Lane
        putter = Putter(
            address, tube, ttr, max_job_bytes, self._metrics,
            on_stall=lambda: self._on_stall(lane), on_resume=lambda: self._changed(lane),
            on_link_change=lambda up: self._link_changed(lane, up), stall_s=POOL_STALL_S,
            high_water=self._high_water,
        )  # fmt: skip
        replayer = Replayer(
            self._writer, putter, self._metrics,
            live_waiting=lambda: still_waiting(self._pending), come_back=self._wake.set,
        )  # fmt: skip
        lane = _Lane(putter, replayer)
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
        # All first attempts at once: a hung server holds the start no longer than one.
        await asyncio.gather(
            *(lane.putter.start(wait=bsproto.CONNECT_TIMEOUT_S) for lane in self._lanes)
        )
        loop = asyncio.get_running_loop()
        for lane in self._lanes:
            lane.task = loop.create_task(self._run_lane(lane), name=f"enqueue {lane.server}")
        self._spooler = loop.create_task(self._run_spooler(), name="pool-spooler")

    def submit(self, encoded: bytes) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending.append((encoded, future))
        self._linger.arrived(len(self._pending))
        self._wake.set()
        if not self._any_healthy():
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
        # replay round or a ping, which hold nobody) are simply cancelled below.
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

    def _spool_wait(self) -> float | None:
        """None when the spool must answer now (no server may answer); otherwise how
        long the spooler may sleep before it looks again."""
        now = time.monotonic()
        waits = [
            max(PUT_STALL_S - POOL_STALL_S - (now - lane.stalled_at), 0.001)
            if lane.putter.stalled else IDLE_CHECK_S
            for lane in self._lanes if lane.may_answer(now)
        ]  # fmt: skip
        return min(waits, default=None)

    # The lanes ------------------------------------------------------------------------

    async def _run_lane(self, lane: _Lane) -> None:
        while True:
            try:
                await self._step(lane)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A lane must outlive any bug: requests would wait for it otherwise.
                log.exception(kv("enqueue_loop_error", server=lane.server))
                lane.putter.drop("enqueue loop error")
                await asyncio.sleep(0.1)

    async def _step(self, lane: _Lane) -> None:
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
        if self._passed_over(lane):
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

    def _passed_over(self, lane: _Lane) -> bool:
        """Is another healthy server so much faster that this one should leave it the
        work? (Least expected wait: a free lane takes work unless this holds.)"""
        limit = lane.rtt - SLOW_MARGIN_S
        return any(o.healthy and 2 * o.rtt < limit for o in self._lanes if o is not lane)

    async def _deliver(self, lane: _Lane, batch: list[Pending]) -> None:
        ranges = lane.putter.ranges([len(item[0]) for item in batch])
        first, *rest = [batch[a:b] for a, b in ranges]
        if rest:
            # One job per lane: the rest goes back for the other lanes (or this one next).
            self._pending[:0] = [item for chunk in rest for item in chunk]
            self._wake.set()
        lane.holds = first
        try:
            await self._put_chunk(lane, first)
        finally:
            lane.holds = []

    async def _put_chunk(self, lane: _Lane, chunk: list[Pending]) -> None:
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
        reason = "connection"
        if lane.putter.connected:
            reason = "refused"
            lane.rest()
            self._nudge.set()
        left = chunk[len(outcomes) :]
        if left:
            self._reput(lane, left, reason, failure)

    def _reput(self, lane: _Lane, chunk: list[Pending], reason: str, error: str) -> None:
        """Hand the requests of a put that failed on this lane back to the pool."""
        self._metrics.reputs.labels(reason).inc()
        log.warning(
            kv("put_handed_on", server=lane.server, reason=reason, error=error, events=len(chunk))
        )
        self._pending[:0] = chunk
        self._wake.set()
        self._nudge.set()

    def _on_stall(self, lane: _Lane) -> None:
        """A command of this lane has been in flight for POOL_STALL_S."""
        lane.stalled_at = time.monotonic()
        chunk = lane.holds
        if chunk and still_waiting(chunk) and any(o.healthy for o in self._lanes if o is not lane):
            lane.holds = []
            self._reput(lane, chunk, "stall", f"no answer in {POOL_STALL_S} s")
        # Without another healthy server the requests wait for this put, as with a
        # single server: spooling them too would store each event twice on success.
        self._nudge.set()

    def _changed(self, lane: _Lane) -> None:
        lane.changed.set()
        self._wake.set()
        self._nudge.set()

    def _link_changed(self, lane: _Lane, up: bool) -> None:
        self._metrics.beanstalkd_up.labels(lane.server).set(1 if up else 0)
        self._metrics.beanstalkd_servers_up.set(sum(o.putter.connected for o in self._lanes))
        if up:
            lane.accepted()
            lane.rtt = 0.0  # measured afresh
        self._changed(lane)

    # Idle time and replay -------------------------------------------------------------

    async def _idle(self, lane: _Lane) -> None:
        # Without traffic a dead server goes unnoticed until the next put: check it now
        # and then, so readiness is honest and the spool can drain.
        if time.monotonic() - lane.putter.last_io > PING_INTERVAL_S:
            await self._ping(lane)
            return
        await self._replay_some(lane)

    async def _ping(self, lane: _Lane) -> None:
        started = time.perf_counter()
        with contextlib.suppress(PutFailed):  # a failed ping has dropped the connection
            await lane.putter.ping()
            lane.timed(time.perf_counter() - started)

    async def _replay_some(self, lane: _Lane) -> None:
        if self._closing or self._replaying.locked() or not lane.healthy:
            return
        async with self._replaying:
            await lane.replayer.round()

    # No server accepts ----------------------------------------------------------------

    async def _run_spooler(self) -> None:
        """Answer from the spool while no server of the pool accepts."""
        while True:
            wait = self._spool_wait() if self._pending else IDLE_CHECK_S
            if wait is None:
                batch, self._pending = self._pending, []
                self._spooler_holds = batch  # a stop waits for these
                try:
                    await self._spool(batch)
                finally:
                    self._spooler_holds = []
                continue
            self._nudge.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, IDLE_CHECK_S)):
                    await self._nudge.wait()

    def _why_spool(self) -> str:
        if any(lane.putter.connected and lane.putter.full for lane in self._lanes):
            return "beanstalkd above its high-water mark"
        return "no beanstalkd up"

    async def _spool(self, batch: list[Pending]) -> None:
        try:
            outcomes = await self._writer.write([item[0] for item in batch], self._why_spool())
        except Exception:
            # A request whose future nobody settles waits forever: answer it, with the
            # loss counted and logged.
            log.exception(kv("spool_write_crashed", events=len(batch)))
            outcomes = [Outcome.LOST] * len(batch)
        settle(batch, outcomes)
