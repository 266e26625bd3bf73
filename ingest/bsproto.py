"""A minimal asyncio beanstalkd client: just what ingest needs (use, put, stats), and
the link that keeps one connection open in the background. Commands and replies come
from ``trackbuf.beanstalk``, the protocol layer the consumer's client uses too; this
module owns only the asyncio stream, its timeouts and reconnecting.

Ingest puts from its event loop instead of a helper thread: a thread needs the GIL
after every put, and a busy event loop hands it over only at the interpreter's switch
interval, so every request would wait milliseconds for it. On the loop, a put is one
write and one short read; requests keep being served while it is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from trackbuf import beanstalk
from trackbuf.log import kv

log = logging.getLogger("trackbuf.ingest.beanstalkd")

CONNECT_TIMEOUT_S = 1.0
# A hung beanstalkd (SIGSTOP, dead host) must not hold requests: after this long the
# put counts as failed and the job goes to the spool. It may still have been stored;
# the consumer drops the duplicate by event_id.
IO_TIMEOUT_S = 2.0
DEFAULT_PRIORITY = beanstalk.DEFAULT_PRIORITY
SERVER_DEFAULT_MAX_JOB = 65535
# Reconnecting: first retry after a failure, doubling after each timeout (a hung or
# blackholed server) up to the cap; a refused connection retries at the first interval.
RECONNECT_INTERVAL_S = 0.5
RECONNECT_MAX_S = 5.0


# The server's answers, as the protocol layer raises them.
BeanstalkError = beanstalk.BeanstalkError
JobTooBig = beanstalk.JobTooBig  # the body exceeds the server's max-job-size
Refused = beanstalk.Refused  # OUT_OF_MEMORY or DRAINING: up, but takes no jobs now
Buried = beanstalk.Buried  # stored, but buried (the server could not grow its ready heap)


class ConnectionLost(BeanstalkError):
    """The connection is unusable; open a new one."""


class TimedOut(ConnectionLost):
    """No answer in time: the server may be hung (stopped, overloaded, blackholed), so
    whoever reconnects should back off instead of paying the timeout again at once."""


class ConnectTimedOut(TimedOut):
    """No answer to the TCP handshake (a blackholed or dead host): unreachable, not a
    server that took the connection and went quiet."""


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, address: tuple[str, int], tube: str) -> Connection:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(*address)
        except TimeoutError:
            raise ConnectTimedOut(f"connect {address[0]}:{address[1]}: no answer") from None
        except OSError as exc:
            raise ConnectionLost(f"connect {address[0]}:{address[1]}: {exc!r}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(reader, writer)
        try:
            await conn.ping(tube)
        except BaseException:
            conn.close()
            raise
        return conn

    async def put(self, body: bytes, ttr: int, priority: int = DEFAULT_PRIORITY) -> int:
        reply = await self._command(beanstalk.put(body, ttr, priority))
        try:
            return beanstalk.put_reply(reply)
        except beanstalk.ProtocolError as exc:
            # EXPECTED_CRLF, BAD_FORMAT, INTERNAL_ERROR, UNKNOWN_COMMAND: the stream is
            # no longer in step with the server, so the connection goes.
            raise ConnectionLost(str(exc)) from None

    async def max_job_size(self) -> int:
        """The server's ``-z`` limit, from ``stats``."""
        limit = (await self.stats()).get("max-job-size")
        return limit if isinstance(limit, int) else SERVER_DEFAULT_MAX_JOB

    async def stats(self) -> dict[str, int | str]:
        """The server-wide ``stats``."""
        reply = await self._command(beanstalk.STATS)
        try:
            size = beanstalk.ok_reply(reply)
            async with asyncio.timeout(IO_TIMEOUT_S):
                data = await self._reader.readexactly(size + 2)
            return beanstalk.parse_stats(beanstalk.body(data, size))
        except TimeoutError:
            raise TimedOut(f"stats: no answer in {IO_TIMEOUT_S} s") from None
        except (OSError, asyncio.IncompleteReadError, BeanstalkError) as exc:
            raise ConnectionLost(repr(exc)) from None

    async def ping(self, tube: str) -> None:
        """``use`` the tube (again): a cheap command that proves the server answers."""
        reply = await self._command(beanstalk.use(tube))
        try:
            beanstalk.use_reply(reply, tube)
        except BeanstalkError as exc:
            raise ConnectionLost(f"use: {exc}") from None

    async def _command(self, data: bytes) -> bytes:
        try:
            async with asyncio.timeout(IO_TIMEOUT_S):
                self._writer.write(data)
                line = await self._reader.readline()
        except TimeoutError:
            command = data.split(b" ", 1)[0].split(b"\r", 1)[0].decode(errors="replace")
            raise TimedOut(f"{command}: no answer in {IO_TIMEOUT_S} s") from None
        except (OSError, ValueError) as exc:
            # ValueError: a reply line longer than the stream limit, i.e. not beanstalkd.
            raise ConnectionLost(repr(exc)) from None
        if not line.endswith(b"\r\n"):
            raise ConnectionLost("connection closed by beanstalkd")
        return line[:-2]

    def close(self) -> None:
        self._writer.close()


class Link:
    """The connection ingest puts through, reopened in the background whenever there
    is none: a hung server costs this task its timeouts, never a request.

    Reachability starts unknown, so an outage that is there from the start is logged
    like any other: ``beanstalkd_down`` with the error, once per outage, not once per
    attempt. ``on_change`` gets True for every new connection (``max_job_size`` is then
    the server's limit) and False when an outage begins.
    """

    def __init__(
        self, address: tuple[str, int], tube: str, on_change: Callable[[bool], None]
    ) -> None:
        self._address = address
        self.server = f"{address[0]}:{address[1]}"  # as logs and metrics name it
        self._tube = tube
        self._on_change = on_change
        self.conn: Connection | None = None
        self.max_job_size = SERVER_DEFAULT_MAX_JOB  # the server's, read at each connect
        self._lost = asyncio.Event()
        self._tried = asyncio.Event()
        self._retry_in = 0.0
        self._backoff = RECONNECT_INTERVAL_S
        self._reachable: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, wait: float) -> None:
        """Start connecting; give the first attempt up to ``wait`` seconds, so that a
        healthy server takes the first requests while a hung one holds nobody."""
        self._task = asyncio.get_running_loop().create_task(self._keep(), name="beanstalkd")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._tried.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=0.1)
        self.drop(self.conn, None)

    def drop(self, conn: Connection | None, error: object) -> None:
        """Close ``conn``; if it is the current connection, reconnecting starts.
        ``error`` None means an expected close (shutdown): nothing is logged."""
        if conn is None:
            return
        conn.close()
        if conn is not self.conn:
            return  # an older connection, already replaced
        self.conn = None
        if error is not None:
            self._down(error)
            if isinstance(error, BaseException):
                self._retry_after(error)
            else:
                self._retry_in = RECONNECT_INTERVAL_S
        self._lost.set()

    async def _keep(self) -> None:
        while True:
            if self.conn is not None:
                await self._lost.wait()
                self._lost.clear()
                continue
            if self._retry_in:
                await asyncio.sleep(self._retry_in)
            try:
                await self._connect()
            except Exception:
                log.exception(kv("beanstalkd_connect_error"))  # a bug: keep trying
                self._retry_in = RECONNECT_MAX_S
            finally:
                self._tried.set()

    async def _connect(self) -> None:
        conn = None
        try:
            conn = await Connection.open(self._address, self._tube)
            limit = await conn.max_job_size()
        except ConnectionLost as exc:
            if conn is not None:
                conn.close()
            self._down(exc)
            self._retry_after(exc)
            return
        except BaseException:  # cancelled at shutdown
            if conn is not None:
                conn.close()
            raise
        self.conn, self.max_job_size = conn, limit
        self._retry_in, self._backoff = 0.0, RECONNECT_INTERVAL_S
        if self._reachable is not True:
            log.info(kv("beanstalkd_connected", server=self.server, max_job_bytes=limit))
            self._reachable = True
        self._on_change(True)

    def _retry_after(self, error: BaseException) -> None:
        if isinstance(error, TimedOut):
            # Hung or blackholed: each attempt costs the full timeouts, so space them.
            self._retry_in = self._backoff
            self._backoff = min(self._backoff * 2, RECONNECT_MAX_S)
        else:
            # Refused or reset: it is down or restarting; cheap to try again soon.
            self._retry_in, self._backoff = RECONNECT_INTERVAL_S, RECONNECT_INTERVAL_S

    def _down(self, error: object) -> None:
        if self._reachable is not False:
            log.error(kv("beanstalkd_down", server=self.server, error=error))
            self._reachable = False
            self._on_change(False)
