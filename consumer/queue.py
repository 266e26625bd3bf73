"""The consumer's beanstalkd connection: one per worker thread, rebuilt after errors."""

from __future__ import annotations

import socket

import greenstalk

Job = greenstalk.Job[bytes]


class Client(greenstalk.Client[bytes]):
    """greenstalk's client plus pipelined reserve and delete.

    beanstalkd answers one connection's commands in order, so k commands can go out in
    one write and their k answers be read back: one round trip instead of k. A batch
    of 40 jobs took 80 round trips, each also a GIL hand-off between worker threads.
    This relies on greenstalk 2.x keeping the socket in ``_sock`` and a buffered
    reader in ``_reader``; tests/integration drive it against a real server.
    """

    def reserve_ready(self, limit: int) -> tuple[list[Job], bool]:
        """Up to ``limit`` jobs that are ready now, without waiting for more, and
        whether beanstalkd warned that a job we hold is near its TTR."""
        self._sock.sendall(b"reserve-with-timeout 0\r\n" * limit)
        jobs: list[Job] = []
        deadline_soon = False
        for _ in range(limit):
            word, values = self._line()
            if word == b"RESERVED" and len(values) == 2 and all(v.isdigit() for v in values):
                size = int(values[1])
                data = self._reader.read(size + 2)
                if len(data) != size + 2 or data[-2:] != b"\r\n":
                    raise ConnectionError("connection closed while reading a job")
                jobs.append(greenstalk.Job(int(values[0]), data[:-2]))
            elif word == b"DEADLINE_SOON":
                deadline_soon = True
            elif word != b"TIMED_OUT":
                raise greenstalk.UnknownResponseError(word, values)
        return jobs, deadline_soon

    def delete_many(self, jobs: list[Job]) -> int:
        """Delete these jobs; how many were still ours (NOT_FOUND: TTR ran out and
        another worker has it, whose insert then skips the stored events)."""
        self._sock.sendall(b"".join(b"delete %d\r\n" % job.id for job in jobs))
        deleted = 0
        for _ in jobs:
            word, values = self._line()
            if word == b"DELETED":
                deleted += 1
            elif word != b"NOT_FOUND":
                raise greenstalk.UnknownResponseError(word, values)
        return deleted

    def _line(self) -> tuple[bytes, list[bytes]]:
        line = self._reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by beanstalkd")
        parts = line.split()
        if not parts:
            raise greenstalk.UnknownResponseError(b"", [])
        return parts[0], parts[1:]


CONNECT_TIMEOUT_S = 2.0
# Longer than any reserve-with-timeout we send, so only a hung server trips it.
IO_TIMEOUT_S = 10.0

# After any of these the connection is unusable (greenstalk does not reconnect, and a
# half-read reply would desynchronise the protocol): drop it and build a new one.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    greenstalk.UnknownResponseError,
    greenstalk.BadFormatError,
    greenstalk.ExpectedCrlfError,
    greenstalk.InternalError,
    greenstalk.UnknownCommandError,
)


def connect(
    address: tuple[str, int], tube: str, watch: bool = True, timeout: float | None = None
) -> Client:
    """A connection that uses ``tube`` and, for workers, watches it.

    Observers pass ``watch=False`` so they are not counted as consumers of the tube,
    and ``timeout`` to bound connecting and every command (a scrape must answer
    within Prometheus' scrape timeout even when beanstalkd hangs).
    """
    connect_s, io_s = (CONNECT_TIMEOUT_S, IO_TIMEOUT_S) if timeout is None else (timeout, timeout)
    sock = socket.create_connection(address, timeout=connect_s)
    try:
        sock.settimeout(io_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if watch:
            return Client(sock, encoding=None, use=tube, watch=tube)
        return Client(sock, encoding=None, use=tube)
    except BaseException:
        sock.close()
        raise
