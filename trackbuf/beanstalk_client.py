"""A blocking beanstalkd client: the consumer's connection (one per worker thread,
rebuilt after errors), and what operator commands use to read or put into the queue.

A small client that owns its socket; commands and replies come from
``trackbuf.beanstalk``, the protocol layer ingest's asyncio client uses too. It
pipelines where the consumer needs throughput: ``reserve_ready`` and ``delete_many``
send k commands in one write and read the k replies back, one round trip instead of
k (a batch of 40 jobs took 80 round trips, each also a GIL hand-off between worker
threads). beanstalkd answers one connection's commands in order, so this is safe.

And it waits where the consumer has nothing to take: ``begin_reserve`` sends one
blocking ``reserve-with-timeout`` and returns at once, the caller waits on
``fileno()`` (with its own, sub-second deadline: beanstalkd's timeout is in whole
seconds) and reads the answer with ``finish_reserve``. Until then the connection
takes no other command: beanstalkd reads nothing more from a connection waiting in
reserve, so anything sent behind it would wait for the job or the timeout.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from types import TracebackType

from trackbuf import beanstalk
from trackbuf.beanstalk import (
    BeanstalkError,
    Buried,
    DeadlineSoon,
    Job,
    NotFound,
    ReserveTimedOut,
)

__all__ = [
    "CONNECTION_ERRORS",
    "BeanstalkError",
    "Buried",
    "Client",
    "DeadlineSoon",
    "Job",
    "NotAnswering",
    "NotFound",
    "ReserveTimedOut",
    "connect",
]

CONNECT_TIMEOUT_S = 2.0
# Longer than any reserve-with-timeout we send, so only a hung server trips it.
IO_TIMEOUT_S = 10.0
# For puts from tools and tests; the consumer's own jobs come from ingest's settings.
DEFAULT_TTR_S = 60

# After any of these the connection is unusable (a half-read reply would desynchronise
# the protocol; Refused means the server is draining or out of memory): drop it and
# build a new one. Closing it hands every job still reserved on it back to beanstalkd.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    beanstalk.ProtocolError,
    beanstalk.Refused,
)


class NotAnswering(TimeoutError):
    """The server holds the connection but did not answer a command in time: it is
    hung (memory pressure, a stuck disk, stopped), not down. Still a connection error
    (TimeoutError is an OSError): the connection goes either way."""


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")
        # A blocking reserve sent by begin_reserve and not yet answered.
        self.waiting = False

    # Connection -----------------------------------------------------------------------

    def set_timeout(self, seconds: float) -> None:
        """Bound every following command (connect() sets IO_TIMEOUT_S)."""
        self._sock.settimeout(seconds)

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Producing ------------------------------------------------------------------------

    def use(self, tube: str) -> None:
        self._send(beanstalk.use(tube))
        beanstalk.use_reply(self._line(), tube)

    def put(
        self, body: bytes, ttr: int = DEFAULT_TTR_S, priority: int = beanstalk.DEFAULT_PRIORITY
    ) -> int:
        """The new job's id; raises Buried (kept, but buried), JobTooBig or Refused."""
        self._send(beanstalk.put(body, ttr, priority))
        return beanstalk.put_reply(self._line())

    # Consuming ------------------------------------------------------------------------

    def watch(self, tube: str) -> int:
        self._send(beanstalk.watch(tube))
        return beanstalk.watch_reply(self._line())

    def ignore(self, tube: str) -> int:
        self._send(beanstalk.ignore(tube))
        return beanstalk.watch_reply(self._line())

    def reserve(self, timeout: int) -> Job:
        """The next ready job within ``timeout`` seconds; raises ReserveTimedOut, or
        DeadlineSoon when a job we hold is within a second of its TTR."""
        self._send(beanstalk.reserve(timeout))
        return self._job(*beanstalk.reserve_reply(self._line()))

    def reserve_ready(self, limit: int) -> tuple[list[Job], bool]:
        """Up to ``limit`` jobs that are ready now, without waiting for more, and
        whether beanstalkd warned that a job we hold is near its TTR."""
        self._send(beanstalk.reserve(0) * limit)
        jobs: list[Job] = []
        deadline_soon = False
        # Every reply is read even after a warning: the stream must stay in step.
        for _ in range(limit):
            try:
                jobs.append(self._job(*beanstalk.reserve_reply(self._line())))
            except DeadlineSoon:
                deadline_soon = True
            except ReserveTimedOut:
                pass
        return jobs, deadline_soon

    def begin_reserve(self, timeout: int) -> None:
        """Send one ``reserve-with-timeout`` and return without its answer; read it with
        ``finish_reserve`` once ``fileno()`` is readable (or to wait for it)."""
        self._send(beanstalk.reserve(timeout))
        self.waiting = True

    def finish_reserve(self) -> Job | None:
        """The answer to ``begin_reserve``: the job, or None when it timed out. Raises
        DeadlineSoon when a job we hold is within a second of its TTR. Blocks until the
        answer comes (at most the reserve's timeout, bounded by the I/O timeout)."""
        self.waiting = False  # whatever happens now, the reply is being consumed
        try:
            return self._job(*beanstalk.reserve_reply(self._line()))
        except ReserveTimedOut:
            return None

    def fileno(self) -> int:
        """The socket, to wait on with poll/select while a reserve is in flight. Valid
        only then: every earlier reply has been read, so nothing of the answer can be
        sitting in the reader's buffer yet."""
        return self._sock.fileno()

    def delete(self, job: Job | int) -> None:
        """Raises NotFound if the job is not ours any more."""
        if self.delete_many([job]) != 1:
            raise NotFound("delete: NOT_FOUND")

    def delete_many(self, jobs: Sequence[Job | int]) -> int:
        """Delete these jobs; how many were still ours (NOT_FOUND: TTR ran out and
        another worker has it, whose insert then skips the stored events)."""
        self._send(b"".join(beanstalk.delete(_id(job)) for job in jobs))
        return sum(beanstalk.delete_reply(self._line()) for _ in jobs)

    def release(self, job: Job | int, priority: int = beanstalk.DEFAULT_PRIORITY) -> None:
        """Raises Buried (no memory to queue it again) or NotFound (not ours)."""
        self._send(beanstalk.release(_id(job), priority))
        beanstalk.release_reply(self._line(), _id(job))

    def bury(self, job: Job | int, priority: int = beanstalk.DEFAULT_PRIORITY) -> None:
        self._send(beanstalk.bury(_id(job), priority))
        beanstalk.bury_reply(self._line())

    def kick(self, bound: int) -> int:
        """Kick up to ``bound`` jobs of the used tube (buried ones first, else delayed)."""
        self._send(beanstalk.kick(bound))
        return beanstalk.kick_reply(self._line())

    # Observing ------------------------------------------------------------------------

    def peek_ready(self) -> Job:
        """The next ready job of the used tube, left in place; NotFound if none."""
        self._send(beanstalk.PEEK_READY)
        return self._job(*beanstalk.found_reply(self._line()))

    def pause_tube(self, tube: str, seconds: int) -> None:
        self._send(beanstalk.pause_tube(tube, seconds))
        beanstalk.pause_reply(self._line())

    def stats(self) -> dict[str, int | str]:
        return self._stats(beanstalk.STATS)

    def stats_tube(self, tube: str) -> dict[str, int | str]:
        """NotFound if the tube does not exist (beanstalkd drops unused empty tubes)."""
        return self._stats(beanstalk.stats_tube(tube))

    def stats_job(self, job: Job | int) -> dict[str, int | str]:
        return self._stats(beanstalk.stats_job(_id(job)))

    # Wire -----------------------------------------------------------------------------

    def _stats(self, command: bytes) -> dict[str, int | str]:
        self._send(command)
        size = beanstalk.ok_reply(self._line())
        return beanstalk.parse_stats(beanstalk.body(self._read(size + 2), size))

    def _job(self, job_id: int, size: int) -> Job:
        return Job(job_id, beanstalk.body(self._read(size + 2), size))

    def _read(self, size: int) -> bytes:
        try:
            return self._reader.read(size)
        except TimeoutError as exc:
            raise NotAnswering(f"beanstalkd sent no reply body in time: {exc}") from None

    def _send(self, data: bytes) -> None:
        if self.waiting:
            # A bug, not an outage: this command would queue behind the blocking
            # reserve and its reply would be read as the reserve's.
            raise RuntimeError("a blocking reserve is in flight: finish_reserve first")
        self._sock.sendall(data)

    def _line(self) -> bytes:
        try:
            line = self._reader.readline()
        except TimeoutError as exc:
            # Connected and no answer: hung, which an operator must hear about apart
            # from a server that is down.
            raise NotAnswering(f"beanstalkd did not answer in time: {exc}") from None
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by beanstalkd")
        return line[:-2]


def _id(job: Job | int) -> int:
    return job if isinstance(job, int) else job.id


def connect(
    address: tuple[str, int], tube: str, watch: bool = True, timeout: float | None = None
) -> Client:
    """A connection that uses ``tube`` and, for workers, watches it (and only it).

    Observers pass ``watch=False`` so they are not counted as consumers of the tube,
    and ``timeout`` to bound connecting and every command (a scrape must answer
    within Prometheus' scrape timeout even when beanstalkd hangs).
    """
    connect_s, io_s = (CONNECT_TIMEOUT_S, IO_TIMEOUT_S) if timeout is None else (timeout, timeout)
    sock = socket.create_connection(address, timeout=connect_s)
    client = Client(sock)
    try:
        client.set_timeout(io_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.use(tube)
        if watch:
            client.watch(tube)
            if tube != "default":
                client.ignore("default")
        return client
    except BaseException:
        client.close()
        raise
