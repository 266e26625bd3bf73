"""One consumer worker thread: reserve jobs, batch them, write them, delete them.

Over a pool of beanstalkd servers each worker has its own share of the servers
(``assign``): every server has at least one worker whatever the thread count. A batch
comes from one server and its jobs are deleted (or released) on that server, on the
connection that reserved them; a worker with several servers takes a batch from each in
turn and sleeps only when all of them were empty.

The order is the guarantee: a job is deleted from beanstalkd only after the batch that
holds it has committed. A crash anywhere before that puts the job back (connection drop
or TTR) and the insert skips what was already stored, so every event ends up stored
exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass

import orjson

from consumer import queue
from consumer.batch import Batch, halves
from consumer.database import Database, DatabaseUnavailable, RejectedData, WriteResult
from consumer.health import Health
from consumer.metrics import ConsumerMetrics
from consumer.sql import query
from trackbuf import codec
from trackbuf.log import kv
from trackbuf.settings import Settings

log = logging.getLogger("trackbuf.consumer")

Job = queue.Job

# While a batch is open and nothing is ready, poll this often until its linger ends
# (beanstalkd's reserve timeout has whole-second resolution).
POLL_S = 0.01
# Reserve timeout while idle: also how quickly an idle worker notices a stop request.
IDLE_RESERVE_S = 1
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
# A worker with several servers cannot block in reserve on one of them while another has
# a backlog: it reserves without waiting and, when every one of its servers was empty,
# sleeps this long before the next round.
ROTATE_IDLE_S = 0.1


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
    """One server of a worker's share: its connection and its own reconnect backoff, so
    a server that is down delays only the jobs it holds."""

    address: tuple[str, int]
    kicker: bool
    client: queue.Client | None = None
    backoff: float = BACKOFF_START_S
    retry_at: float = 0.0
    next_kick: float = 0.0
    empty: bool = False


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
    ) -> None:
        self.index = index
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.stop = stop
        self.state = WorkerState()
        self._db = Database(settings.require_database())
        pool = settings.beanstalkd_addresses
        # The first worker on a server (index < pool size) kicks its buried jobs: every
        # server has one such worker, and other consumer processes kick too, harmlessly.
        self._servers = [
            Server(pool[s], kicker=index < len(pool))
            for s in assign(index, settings.threads, len(pool))
        ]
        self._rotating = len(self._servers) > 1
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
                client = self._beanstalkd()
                if client is None:
                    continue
                if self._current.kicker:
                    self._kick_buried(client)
                    if self._client is None:
                        continue
                batch = self._fill(client)
                if batch.items:
                    self._flush(batch)
                    continue
                self.state.drained = self._round_empty()
                if self.state.drained:
                    if self.settings.burst:
                        break
                    if self._rotating:
                        self.stop.wait(ROTATE_IDLE_S)
                        for server in self._servers:
                            server.empty = False
        except Exception:
            self.state.crashed = True
            log.exception(kv("worker_crashed", worker=self.index))
            raise
        finally:
            # Closing the connections hands any job still reserved back to beanstalkd.
            self._drop_all()
            self._db.close()

    def _fill(self, client: queue.Client) -> Batch[Job]:
        batch: Batch[Job] = Batch(self.settings.batch_size, self.settings.linger_ms / 1000)
        while True:
            now = time.monotonic()
            if batch.due(now) or self.stop.is_set():
                return batch
            try:
                if batch.items:
                    # The batch is open: take what is ready now, many jobs per round trip.
                    jobs, deadline_soon = client.reserve_ready(batch.jobs_wanted(PIPELINE_JOBS))
                    if deadline_soon:
                        return batch  # a held job is near its TTR: write now
                else:
                    # A worker with several servers never waits in reserve: another of
                    # its servers may have a backlog (run() sleeps when all are empty).
                    rest = self.settings.burst or self._rotating
                    idle_wait = 0 if rest else IDLE_RESERVE_S
                    jobs = [client.reserve(timeout=idle_wait)]
            except queue.ReserveTimedOut:
                jobs = []
            except queue.DeadlineSoon:
                return batch
            except queue.CONNECTION_ERRORS as exc:
                # The server returns our reserved jobs to ready when the connection drops,
                # so the partial batch is simply forgotten, not written.
                log.warning(kv(lost_or_hung(exc), worker=self.index, error=repr(exc),
                               beanstalkd=where(self._current.address)))  # fmt: skip
                self._drop_client()
                return Batch(self.settings.batch_size, 0)
            if not jobs:
                if not batch.items:
                    self._current.empty = True
                    rest = self.settings.burst or self._rotating
                    if rest or not self._db_checked_lately():
                        return batch  # run() looks at the database, then comes back
                    continue
                if self.settings.burst:
                    return batch  # nothing more to wait for
                self.stop.wait(min(POLL_S, max(batch.remaining(now), 0)))
                continue
            self._current.empty = False
            for job in jobs:
                batch.add(job, codec.event_count(job.body) or 1, now)

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
        self._release(list(pending.values()))
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
                self.metrics.end_to_end.observe(committed - occurred, count)

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
        if self._client is None:
            return  # connection gone: the jobs come back and are deduplicated
        try:
            # NOT_FOUND is not an error: TTR ran out and someone else has the job; their
            # insert skips what we stored.
            self.state.jobs_done += self._client.delete_many(jobs)
        except queue.CONNECTION_ERRORS as exc:
            log.warning(kv("delete_failed", worker=self.index, error=repr(exc)))
            self._drop_client()

    def _release(self, jobs: list[Job]) -> None:
        if self._client is None:
            return
        for job in jobs:
            try:
                self._client.release(job)
            except queue.NotFound:
                pass  # gone (TTR): someone else has it
            except queue.Buried:
                # Kept, but buried by a server out of memory: counted (it pins binlog
                # files and says beanstalkd is in trouble); the kicker brings it back.
                self.metrics.buried_jobs.inc()
            except queue.CONNECTION_ERRORS:
                self._drop_client()  # closing releases everything we still held
                return

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

    @property
    def _client(self) -> queue.Client | None:
        """The connection to the server the current batch comes from."""
        return self._current.client

    def _round_empty(self) -> bool:
        """Was every server of this worker found empty since the last sleep? A server
        that is down counts as not empty: its jobs are still to come."""
        return all(server.empty for server in self._servers)

    def _beanstalkd(self) -> queue.Client | None:
        """Move to the next of this worker's servers that is not backing off and return
        its connection (made if needed); None after a failed connect or, when all of
        them are backing off, after waiting for the first one due."""
        now = time.monotonic()
        for step in range(1, len(self._servers) + 1):
            server = self._servers[(self._turn + step) % len(self._servers)]
            if server.client is not None or server.retry_at <= now:
                self._turn = (self._turn + step) % len(self._servers)
                break
        else:
            self.stop.wait(max(min(s.retry_at for s in self._servers) - now, 0))
            return None
        self._current = server
        if server.client is not None:
            return server.client
        try:
            server.client = queue.connect(server.address, self.settings.tube)
        except queue.CONNECTION_ERRORS as exc:
            hung = isinstance(exc, queue.NotAnswering)
            event = "beanstalkd_hung" if hung else "beanstalkd_unreachable"
            log.error(kv(event, worker=self.index, beanstalkd=where(server.address),
                         error=repr(exc)))  # fmt: skip
            server.retry_at = time.monotonic() + jittered(server.backoff)
            server.backoff = min(server.backoff * 2, BACKOFF_MAX_S)
            server.empty = False
            return None
        server.backoff = BACKOFF_START_S
        return server.client

    def _kick_buried(self, client: queue.Client) -> None:
        now = time.monotonic()
        if now < self._current.next_kick:
            return
        self._current.next_kick = now + KICK_INTERVAL_S
        try:
            # Checked first because a kick with nothing buried would kick delayed jobs.
            buried = client.stats_tube(self.settings.tube)["current-jobs-buried"]
            if not buried:
                return
            kicked = client.kick(KICK_BOUND)
        except queue.NotFound:
            return  # the tube does not exist yet: nothing was ever put
        except queue.CONNECTION_ERRORS as exc:
            log.warning(kv(lost_or_hung(exc), worker=self.index, error=repr(exc)))
            self._drop_client()
            return
        self.metrics.kicked_jobs.inc(kicked)
        log.warning(kv("buried_jobs_kicked", worker=self.index, buried=buried, kicked=kicked,
                       beanstalkd=where(self._current.address)))  # fmt: skip

    def _drop_client(self) -> None:
        """Close the current server's connection (its reserved jobs go back to ready)."""
        client, self._current.client = self._current.client, None
        if client is not None:
            with contextlib.suppress(OSError):
                client.close()

    def _drop_all(self) -> None:
        for server in self._servers:
            self._current = server
            self._drop_client()


def lost_or_hung(exc: BaseException) -> str:
    """The log event for a connection given up: a server that holds the connection and
    does not answer (memory pressure, a stuck disk, stopped) is not one that went away,
    and reconnecting does not cure it."""
    return "beanstalkd_hung" if isinstance(exc, queue.NotAnswering) else "beanstalkd_lost"
