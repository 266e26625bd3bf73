"""A minimal asyncio beanstalkd client: just what ingest needs (use, put, stats).

Ingest puts from its event loop instead of a helper thread: a thread needs the GIL
after every put, and a busy event loop hands it over only at the interpreter's switch
interval, so every request would wait milliseconds for it. On the loop, a put is one
write and one short read; requests keep being served while it is in flight.
"""

from __future__ import annotations

import asyncio
import socket

CONNECT_TIMEOUT_S = 1.0
# A hung beanstalkd (SIGSTOP, dead host) must not hold requests: after this long the
# put counts as failed and the job goes to the spool. It may still have been stored;
# the consumer drops the duplicate by event_id.
IO_TIMEOUT_S = 2.0
DEFAULT_PRIORITY = 1 << 16
SERVER_DEFAULT_MAX_JOB = 65535


class BeanstalkError(Exception):
    """Base of everything this client raises."""


class ConnectionLost(BeanstalkError):
    """The connection is unusable; open a new one."""


class TimedOut(ConnectionLost):
    """No answer in time: the server may be hung (stopped, overloaded, blackholed), so
    whoever reconnects should back off instead of paying the timeout again at once."""


class JobTooBig(BeanstalkError):
    """JOB_TOO_BIG: the body exceeds the server's max-job-size."""


class Refused(BeanstalkError):
    """OUT_OF_MEMORY or DRAINING: the server is up but takes no jobs now."""


class Buried(BeanstalkError):
    """BURIED <id>: stored, but buried (the server could not grow its ready heap)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"BURIED {job_id}")
        self.job_id = job_id


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
            raise TimedOut(f"connect {address[0]}:{address[1]}: no answer") from None
        except OSError as exc:
            raise ConnectionLost(f"connect {address[0]}:{address[1]}: {exc!r}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(reader, writer)
        try:
            reply = await conn._command(b"use " + tube.encode() + b"\r\n")
            if reply != b"USING " + tube.encode():
                raise ConnectionLost(f"unexpected reply to use: {reply!r}")
        except BaseException:
            conn.close()
            raise
        return conn

    async def put(self, body: bytes, ttr: int, priority: int = DEFAULT_PRIORITY) -> int:
        head = b"put %d 0 %d %d\r\n" % (priority, ttr, len(body))
        reply = await self._command(head + body + b"\r\n")
        word, _, rest = reply.partition(b" ")
        if word in (b"INSERTED", b"BURIED") and rest.isdigit():
            if word == b"BURIED":
                raise Buried(int(rest))
            return int(rest)
        if word == b"JOB_TOO_BIG":
            raise JobTooBig(reply.decode())
        if word in (b"OUT_OF_MEMORY", b"DRAINING"):
            raise Refused(reply.decode())
        # EXPECTED_CRLF, BAD_FORMAT, INTERNAL_ERROR, UNKNOWN_COMMAND: the stream is no
        # longer in step with the server, so the connection goes.
        raise ConnectionLost(f"put answered {reply!r}")

    async def max_job_size(self) -> int:
        """The server's ``-z`` limit, from ``stats``."""
        reply = await self._command(b"stats\r\n")
        word, _, size = reply.partition(b" ")
        if word != b"OK" or not size.isdigit():
            raise ConnectionLost(f"stats answered {reply!r}")
        try:
            async with asyncio.timeout(IO_TIMEOUT_S):
                data = await self._reader.readexactly(int(size) + 2)
        except TimeoutError:
            raise TimedOut(f"stats: no answer in {IO_TIMEOUT_S} s") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise ConnectionLost(repr(exc)) from None
        for line in data.decode(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "max-job-size" and value.strip().isdigit():
                return int(value)
        return SERVER_DEFAULT_MAX_JOB

    async def ping(self, tube: str) -> None:
        if await self._command(b"use " + tube.encode() + b"\r\n") != b"USING " + tube.encode():
            raise ConnectionLost("ping: unexpected reply")

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
