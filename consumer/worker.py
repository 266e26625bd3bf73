"""One consumer worker thread: reserve jobs, batch them, write them, delete them.

Over a pool of beanstalkd servers each worker has its own share of the servers
(``assign``): every server has at least one worker whatever the thread count. A batch
comes from one server and its jobs are deleted (or released) on that server, on the
connection that reserved them.

The worker waits in beanstalkd rather than asking it again and again: with nothing to
take it keeps one blocking reserve in flight on each of its servers and waits on all
their sockets at once (``poll``), so whichever server gets a job first wakes it, and a
server's ready job never waits for another server's timeout. While a batch is open it
waits the same way on the batch's server for what is left of the linger, and takes a
backlog many jobs per round trip (``consumer/pacing.py`` says how many).

The order is the guarantee: a job is deleted from beanstalkd only after the batch that
holds it has committed. A crash anywhere before that puts the job back (connection drop
or TTR) and the insert skips what was already stored, so every event ends up stored
exactly once. Committed jobs whose connection still has a blocking reserve in flight
are deleted as soon as that reserve answers (within its one-second timeout): deleted
late, never early.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from consumer.batch import Batch, halves
from consumer.health import Health
from consumer.metrics import ConsumerMetrics
from consumer.pacing import Pace
from consumer.turns import Turn, Turns
from consumer.writer import EventWriter, WriteResult
from store.database import DatabaseUnavailable, RejectedData
from store.sql import query
from trackbuf import beanstalk_client, codec
from trackbuf.log import kv
from trackbuf.settings import Settings

log = logging.getLogger("trackbuf.consumer")

Job = beanstalk_client.Job

# Timeout of every blocking reserve (beanstalkd counts whole seconds). The worker waits
# less than that on its own clock when a batch's linger ends sooner; the reserve stays
# in flight and its answer (a job, or TIMED_OUT) is read at the next look. It also
# bounds how long a stop request or a deferred delete waits.
RESERVE_TIMEOUT_S = 1
# How long an idle worker waits before looking at its stop flag and the database again.
IDLE_WAIT_S = 1.0
# Most jobs asked for in one pipelined round trip while a batch fills.
PIPELINE_JOBS = 64
BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 5.0
# trackbuf never buries a job on purpose: beanstalkd buries a put or a release that it
# has no memory to queue. Those jobs hold good events and pin binlog files, so the
# first worker kicks them back to ready this often (and whenever it starts).
KICK_INTERVAL_S = 5.0
# How often an idle worker checks that the database still answers.
IDLE_DB_CHECK_S = 5.0
KICK_BOUND = 10_000


def assign(index: int, threads: int, servers: int) -> list[int]:
    """Which servers (indexes into the pool) worker ``index`` of ``threads`` reserves
    from: round-robin, thread i on server i % S when there are at least as many threads
    as servers, else every server s with s % threads == i, so none is left unwatched."""
    if threads >= servers:
        return [index % servers]
    return [s for s in range(servers) if s % threads == index]


def where(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


@dataclass
class Server:
    """One server of a worker's share: its connection, its own reconnect backoff (so a
    server that is down delays only the jobs it holds), and what the worker holds there."""

    address: tuple[str, int]
    kicker: bool
    # Only the thread holding it collects a batch from this server (consumer/turns.py).
    turn: Turn = field(default_factory=Turn)
    client: beanstalk_client.Client | None = None
    backoff: float = BACKOFF_START_S
    retry_at: float = 0.0
    next_kick: float = 0.0
    # Burst mode: found empty since the worker last looked at every server.
    empty: bool = False
    # Reserved by a blocking reserve, not yet in a batch.
    carried: list[Job] = field(default_factory=list)
    # Committed, to delete once the blocking reserve in flight has answered.
    deferred: list[Job] = field(default_factory=list)
    # When the blocking reserve in flight was sent.
    sent_at: float = 0.0
    # beanstalkd warned (DEADLINE_SOON) that a job held here is near its TTR.
    deadline_soon: bool = False
    pace: Pace = field(default_factory=lambda: Pace(PIPELINE_JOBS))

    @property
    def waiting(self) -> bool:
        return self.client is not None and self.client.waiting


def jittered(delay: float) -> float:
    """Full jitter: many workers retrying an outage do not stampede together."""
    return random.uniform(delay / 2, delay)


@dataclass
class WorkerState:
    jobs_done: int = 0
    drained: bool = False
    crashed: bool = False


class Worker:
    def __init__(
        self,
        index: int,
        settings: Settings,
        metrics: ConsumerMetrics,
        health: Health,
        stop: threading.Event,
        turns: Turns | None = None,
    ) -> None:
        self.index = index
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.stop = stop
        self.state = WorkerState()
        self._db = EventWriter(settings.require_database())
        pool = settings.beanstalkd_addresses
        turns = turns if turns is not None else Turns()
        # The first worker on a server (index < pool size) kicks its buried jobs: every
        # server has one such worker, and other consumer processes kick too, harmlessly.
        self._servers = [
            Server(pool[s], kicker=index < len(pool), turn=turns.of(pool[s]))
            for s in assign(index, settings.threads, len(pool))
        ]
        self._turn = 0
        self._current = self._servers[0]
        # None until the first look: a database that is down when the consumer starts
        # is logged like one that goes down later.
        self._db_up: bool | None = None
        self._next_db_check = 0.0
        self._db_backoff = BACKOFF_START_S

    # Main loop ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                known_up = self._db_up and self._db_checked_lately()
                if not known_up and not self._wait_for_database():
                    continue
                server = self._next_server()
                if server is None:
                    continue
                batch = self._fill(server)
                if batch.items:
                    if not server.waiting:
                        # Another thread collects while this one writes. With a reserve
                        # still in flight this one keeps the turn: that reserve already
                        # waits for the next job, and a second waiter would split them.
                        server.turn.give(self.index)
                    self._flush(batch)
                    continue
                if self.settings.burst and all(s.empty for s in self._servers):
                    self.state.drained = True
                    break
        except Exception:
            self.state.crashed = True
            log.exception(kv("worker_crashed", worker=self.index))
            raise
        finally:
            # Deferred deletes first (their jobs are committed); then closing the
            # connections hands every job still reserved back to beanstalkd.
            with contextlib.suppress(Exception):
                self._settle_all()
            self._drop_all()
            self._db.close()

    def _next_server(self) -> Server | None:
        """The server the next batch comes from, among those whose turn this thread
        holds: one holding a job or looking backlogged, taken in turn; else wait (a
        blocking reserve in flight on each) until one has a job. None when nothing came
        or another thread has the turn (the caller looks at the stop flag and the
        database, then asks again)."""
        if not self._connect_due():
            return None
        if self.settings.burst:
            return self._in_turn(lambda s: s.client is not None)
        self._poll(0)  # answers already in, without waiting
        timeout = IDLE_WAIT_S
        if self._db_up:
            # An idle worker still checks the database every IDLE_DB_CHECK_S.
            timeout = min(timeout, max(self._next_db_check - time.monotonic(), 0))
        held = [s for s in self._servers if s.client is not None and s.turn.take(self.index)]
        if not held:
            # Another thread collects from this server: wait for the turn, not in
            # beanstalkd (this thread has no reserve in flight: it handed the turn on
            # only without one).
            connected = next((s for s in self._servers if s.client is not None), None)
            if connected is None:
                return None  # the poll above lost the last connection: reconnect next round
            connected.turn.take(self.index, timeout)
            return None
        server = self._in_turn(lambda s: s in held and (bool(s.carried) or s.pace.backlogged))
        if server is not None:
            return server
        for each in held:
            if not each.waiting:
                self._begin_wait(each)
        self._poll(timeout)
        return self._in_turn(lambda s: s in held and bool(s.carried))

    def _in_turn(self, wanted: Callable[[Server], bool]) -> Server | None:
        """The next server after the last one used that is connected and ``wanted``."""
        count = len(self._servers)
        for step in range(1, count + 1):
            server = self._servers[(self._turn + step) % count]
            if server.client is not None and wanted(server):
                self._turn = (self._turn + step) % count
                self._current = server
                return server
        return None

    def _fill(self, server: Server) -> Batch[Job]:
        batch: Batch[Job] = Batch(self.settings.batch_size, self.settings.linger_ms / 1000)
        while True:
            now = time.monotonic()
            for job in server.carried:
                batch.add(job, codec.event_count(job.body) or 1, now)
            server.carried.clear()
            if server.deadline_soon:
                server.deadline_soon = False
                if batch.items:
                    return batch  # a held job is near its TTR: write now
            if server.client is None:
                # The connection dropped: the server returns our reserved jobs to ready,
                # so the partial batch is simply forgotten, not written.
                return Batch(self.settings.batch_size, 0)
            if batch.due(now) or self.stop.is_set():
                return batch
            if self.settings.burst:
                # Drain what is queued and never wait: many jobs per round trip.
                jobs = self._reserve_ready(server, batch.jobs_wanted(PIPELINE_JOBS))
                server.empty = not jobs and not batch.items
                if not jobs:
                    return batch
                continue
            wanted = batch.jobs_wanted(PIPELINE_JOBS)
            size = 0 if server.waiting else server.pace.round_size(wanted)
            if size:
                jobs = self._reserve_ready(server, size)
                server.pace.took(size, len(jobs))
                continue
            if not batch.items:
                return batch  # nothing here: the caller waits on all its servers at once
            # The batch is open and nothing is known to be ready: wait in beanstalkd for
            # one job, for at most what is left of the linger.
            if not server.waiting:
                self._begin_wait(server)
            self._poll(batch.remaining(now), only=server)

    def _reserve_ready(self, server: Server, size: int) -> list[Job]:
        """Up to ``size`` jobs that are ready now, in one round trip, into ``carried``."""
        assert server.client is not None
        try:
            jobs, deadline_soon = server.client.reserve_ready(size)
        except beanstalk_client.CONNECTION_ERRORS as exc:
            self._lost(server, exc)
            return []
        self.metrics.reserve_commands.inc(size)
        self.metrics.jobs_reserved.inc(len(jobs))
        server.carried.extend(jobs)
        server.deadline_soon = server.deadline_soon or deadline_soon
        return jobs

    def _begin_wait(self, server: Server) -> None:
        assert server.client is not None
        try:
            server.client.begin_reserve(RESERVE_TIMEOUT_S)
        except beanstalk_client.CONNECTION_ERRORS as exc:
            self._lost(server, exc)
            return
        server.sent_at = time.monotonic()
        self.metrics.reserve_commands.inc()

    def _poll(self, timeout: float, only: Server | None = None) -> None:
        """Wait up to ``timeout`` seconds for the blocking reserves in flight (on
        ``only``, or on every server of this worker) and read those that answered."""
        waiting = [s for s in ([only] if only else self._servers) if s.waiting]
        if not waiting:
            return
        poller = select.poll()
        by_fd: dict[int, Server] = {}
        for server in waiting:
            assert server.client is not None
            by_fd[server.client.fileno()] = server
            poller.register(server.client.fileno(), select.POLLIN)
        for fd, _ in poller.poll(max(0, math.ceil(timeout * 1000))):
            self._answer(by_fd[fd])

    def _answer(self, server: Server) -> None:
        """Read the answer of the blocking reserve in flight on ``server`` (waiting for
        it if it has not come), then send what waited behind it."""
        assert server.client is not None
        try:
            job = server.client.finish_reserve()
        except beanstalk_client.DeadlineSoon:
            server.deadline_soon = True
        except beanstalk_client.CONNECTION_ERRORS as exc:
            self._lost(server, exc)
            return
        else:
            server.pace.waited(job is not None, time.monotonic() - server.sent_at)
            if job is not None:
                server.carried.append(job)
                self.metrics.jobs_reserved.inc()
        if server.deferred:
            deferred, server.deferred = server.deferred, []
            self._delete_on(server, deferred)
        if server.kicker and server.client is not None:
            self._kick_buried(server)

    def _settle(self, server: Server) -> None:
        """Make ``server``'s connection free for other commands."""
        if server.waiting:
            self._answer(server)

    def _settle_all(self) -> None:
        for server in self._servers:
            self._settle(server)

    def _connect_due(self) -> bool:
        """Connect the servers whose backoff is over (kicking each kicker's buried jobs);
        False, after waiting for the first one due, when none is connected."""
        now = time.monotonic()
        for server in self._servers:
            if server.client is None and server.retry_at <= now:
                self._connect(server)
            if server.kicker and server.client is not None and not server.waiting:
                self._kick_buried(server)
        if any(server.client is not None for server in self._servers):
            return True
        self.stop.wait(max(min(s.retry_at for s in self._servers) - time.monotonic(), 0))
        return False

    def _connect(self, server: Server) -> None:
        try:
            server.client = beanstalk_client.connect(server.address, self.settings.tube)
        except beanstalk_client.CONNECTION_ERRORS as exc:
            hung = isinstance(exc, beanstalk_client.NotAnswering)
            event = "beanstalkd_hung" if hung else "beanstalkd_unreachable"
            log.error(kv(event, worker=self.index, beanstalkd=where(server.address),
                         error=repr(exc)))  # fmt: skip
            server.retry_at = time.monotonic() + jittered(server.backoff)
            server.backoff = min(server.backoff * 2, BACKOFF_MAX_S)
            server.empty = False
            return
        server.backoff = BACKOFF_START_S
        server.pace = Pace(PIPELINE_JOBS)

    # Writing --------------------------------------------------------------------------

    def _flush(self, batch: Batch[Job]) -> None:
        pending = {job.id: job for job in batch.items}
        framed: list[Job] = []
        unframed: list[Job] = []
        for job in batch.items:
            (unframed if codec.event_count(job.body) is None else framed).append(job)
        try:
            if framed:
                self._store(framed, pending)
            for job in unframed:
                self._salvage(job, "job is not a trackbuf v1 frame", pending)
        except DatabaseUnavailable as exc:
            self._give_back(pending, exc)
        except Exception as exc:
            # Unexpected, so not trusted to say anything about the data: hand the jobs
            # back and carry on after a pause rather than kill the consumer.
            log.exception(kv("batch_failed", worker=self.index, jobs=len(pending)))
            self._db.reset()
            self._give_back(pending, exc)

    def _give_back(self, pending: dict[int, Job], exc: Exception) -> None:
        """Release a failed batch and pause: the database may answer pings yet refuse
        writes (read-only after a failover, disk full), and retrying at once would
        spin through reserve, fail, release."""
        self._database_down(exc)
        self._release(self._current, list(pending.values()))
        self._hand_back()
        self.metrics.batches.labels("released").inc()
        self.health.pause(jittered(self._db_backoff), self.stop)
        self._db_backoff = min(self._db_backoff * 2, BACKOFF_MAX_S)

    def _store(self, jobs: list[Job], pending: dict[int, Job]) -> None:
        """Insert these jobs in one statement; on a data error, split to isolate it."""
        events = sum(codec.event_count(job.body) or 0 for job in jobs)
        started = time.perf_counter()
        try:
            result = self._db.insert_jobs([job.body for job in jobs], events)
        except RejectedData as exc:
            if len(jobs) == 1:
                self._salvage(jobs[0], str(exc), pending)
            else:
                self.metrics.batches.labels("split").inc()
                for half in halves(jobs):
                    self._store(half, pending)
            return
        # Committed. The jobs are deleted whatever happens to the bookkeeping: an error
        # in it would otherwise release stored jobs and be logged as a database outage.
        try:
            self._db_backoff = BACKOFF_START_S  # a commit, not a ping, proves the database
            self._next_db_check = time.monotonic() + IDLE_DB_CHECK_S
            self.health.committed()
            self.metrics.insert_duration.observe(time.perf_counter() - started)
            self._count(result)
            self.metrics.batches.labels("committed").inc()
            self.metrics.batch_events.observe(events)
            self._time_end_to_end(jobs)
        except Exception:
            log.exception(kv("bookkeeping_failed", worker=self.index, jobs=len(jobs)))
        self._delete(jobs, pending)

    def _count(self, result: WriteResult) -> None:
        self.metrics.events_written.inc(result.inserted)
        self.metrics.duplicates.inc(result.duplicates)

    def _time_end_to_end(self, jobs: list[Job]) -> None:
        """Observe each committed job's age, once per event in it (see
        codec.first_event_time for why per job). A job delivered again after a crash
        is observed again: the histogram counts deliveries, not distinct events."""
        committed = time.time()
        for job in jobs:
            occurred = codec.first_event_time(job.body)
            if occurred is not None:
                count = codec.event_count(job.body) or 1
                self.metrics.end_to_end.observe_many(committed - occurred, count)

    def _salvage(self, job: Job, reason: str, pending: dict[int, Job]) -> None:
        """Store a job's good events one by one and set its bad ones aside."""
        try:
            items = codec.decode_frame(job.body)
        except codec.CodecError as exc:
            self._dead_letter("undecodable_job", f"{reason}; {exc}", None, job.body)
            self._delete([job], pending)
            return
        for item in items:
            try:
                event = codec.decode_event(item)
            except codec.CodecError as exc:
                self._dead_letter("invalid_event", str(exc), None, orjson.dumps(item))
                continue
            single = codec.encode_job([codec.encode_event(event)])
            try:
                result = self._db.insert_jobs([single], 1)
            except RejectedData as exc:
                self._dead_letter("rejected_by_database", str(exc), event.event_id, single)
                continue
            try:
                self._count(result)  # committed: see _store
            except Exception:
                log.exception(kv("bookkeeping_failed", worker=self.index, jobs=1))
        self._delete([job], pending)

    def _dead_letter(self, label: str, reason: str, event_id: object, body: bytes) -> None:
        status = self._db.execute(query("insert_dead_letter"), reason, event_id, body)
        if status.endswith(" 0"):
            return  # set aside already, by an earlier delivery of the same job
        self.metrics.dead_events.labels(label).inc()
        # First line only: PostgreSQL's DETAIL repeats the row, IP address included.
        detail = reason.splitlines()[0][:200] if reason else ""
        log.warning(kv("dead_letter", worker=self.index, reason=label, detail=detail))

    def _delete(self, jobs: list[Job], pending: dict[int, Job]) -> None:
        for job in jobs:
            pending.pop(job.id, None)
        server = self._current  # the batch's server: its jobs are reserved there
        if server.waiting:
            # Its connection waits in a blocking reserve: delete when that answers.
            server.deferred.extend(jobs)
            return
        self._delete_on(server, jobs)

    def _delete_on(self, server: Server, jobs: list[Job]) -> None:
        if server.client is None:
            return  # connection gone: the jobs come back and are deduplicated
        try:
            # NOT_FOUND is not an error: TTR ran out and someone else has the job; their
            # insert skips what we stored.
            self.state.jobs_done += server.client.delete_many(jobs)
        except beanstalk_client.CONNECTION_ERRORS as exc:
            log.warning(kv("delete_failed", worker=self.index, error=repr(exc),
                           beanstalkd=where(server.address)))  # fmt: skip
            self._drop(server)

    def _release(self, server: Server, jobs: list[Job]) -> None:
        self._settle(server)
        if server.client is None:
            return
        for job in jobs:
            try:
                server.client.release(job)
            except beanstalk_client.NotFound:
                pass  # gone (TTR): someone else has it
            except beanstalk_client.Buried:
                # Kept, but buried by a server out of memory: counted (it pins binlog
                # files and says beanstalkd is in trouble); the kicker brings it back.
                self.metrics.buried_jobs.inc()
            except beanstalk_client.CONNECTION_ERRORS:
                self._drop(server)  # closing releases everything we still held
                return

    def _hand_back(self) -> None:
        """Hold nothing while the database is down: answer the reserves in flight (their
        deferred deletes go out), release what they brought, and hand the turns on."""
        for server in self._servers:
            self._settle(server)
            carried, server.carried = server.carried, []
            if carried:
                self._release(server, carried)
            server.turn.give(self.index)

    # Outages --------------------------------------------------------------------------

    def _database_down(self, exc: Exception) -> None:
        if self._db_up is not False:  # once per outage, and also when it starts down
            log.error(kv("database_down", worker=self.index, error=str(exc)[:200]))
        self._db_up = False
        self.health.database(False)

    def _wait_for_database(self) -> bool:
        """Probe the database holding no jobs; back off with jitter while it is down.

        Holding nothing matters: reserve/release-with-delay loops during an outage
        would pin beanstalkd binlog files, and reserved jobs would idle until TTR.
        """
        try:
            self._db.ping()
        except DatabaseUnavailable as exc:
            self._database_down(exc)
            self._hand_back()
            self.health.pause(jittered(self._db_backoff), self.stop)
            self._db_backoff = min(self._db_backoff * 2, BACKOFF_MAX_S)
            return False
        if self._db_up is not True:
            log.info(kv("database_up", worker=self.index))
        self._db_up = True
        self._next_db_check = time.monotonic() + IDLE_DB_CHECK_S
        self.health.database(True)
        return True

    def _db_checked_lately(self) -> bool:
        """Did a commit or a ping show the database up in the last IDLE_DB_CHECK_S? An
        idle worker writes nothing, and without a look now and then an outage would go
        unnoticed while /readyz and database_up said all is well."""
        return time.monotonic() < self._next_db_check

    def _kick_buried(self, server: Server) -> None:
        now = time.monotonic()
        if now < server.next_kick or server.client is None:
            return
        server.next_kick = now + KICK_INTERVAL_S
        try:
            # Checked first because a kick with nothing buried would kick delayed jobs.
            buried = server.client.stats_tube(self.settings.tube)["current-jobs-buried"]
            if not buried:
                return
            kicked = server.client.kick(KICK_BOUND)
        except beanstalk_client.NotFound:
            return  # the tube does not exist yet: nothing was ever put
        except beanstalk_client.CONNECTION_ERRORS as exc:
            self._lost(server, exc)
            return
        self.metrics.kicked_jobs.inc(kicked)
        log.warning(kv("buried_jobs_kicked", worker=self.index, buried=buried, kicked=kicked,
                       beanstalkd=where(server.address)))  # fmt: skip

    def _lost(self, server: Server, exc: BaseException) -> None:
        log.warning(kv(lost_or_hung(exc), worker=self.index, error=repr(exc),
                       beanstalkd=where(server.address)))  # fmt: skip
        self._drop(server)

    def _drop(self, server: Server) -> None:
        """Close a server's connection: every job reserved on it (a partial batch,
        carried jobs, committed ones awaiting delete) goes back to ready, and what was
        stored already is skipped as a duplicate when it comes again."""
        client, server.client = server.client, None
        server.carried.clear()
        server.deferred.clear()
        server.deadline_soon = False
        server.turn.give(self.index)
        if client is not None:
            with contextlib.suppress(OSError):
                client.close()

    def _drop_all(self) -> None:
        for server in self._servers:
            self._drop(server)


def lost_or_hung(exc: BaseException) -> str:
    """The log event for a connection given up: a server that holds the connection and
    does not answer (memory pressure, a stuck disk, stopped) is not one that went away,
    and reconnecting does not cure it."""
    return (
        "beanstalkd_hung" if isinstance(exc, beanstalk_client.NotAnswering) else "beanstalkd_lost"
    )
