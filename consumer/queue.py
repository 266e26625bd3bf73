"""The consumer's beanstalkd connection: one per worker thread, rebuilt after errors."""

from __future__ import annotations

import socket

import greenstalk

# Bodies are bytes end to end: the consumer hands them to PostgreSQL untouched.
Client = greenstalk.Client[bytes]
Job = greenstalk.Job[bytes]

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


def connect(address: tuple[str, int], tube: str, watch: bool = True) -> Client:
    """A connection that uses ``tube`` and, for workers, watches it.

    Observers pass ``watch=False`` so they are not counted as consumers of the tube.
    """
    sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT_S)
    try:
        sock.settimeout(IO_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if watch:
            return greenstalk.Client(sock, encoding=None, use=tube, watch=tube)
        return greenstalk.Client(sock, encoding=None, use=tube)
    except BaseException:
        sock.close()
        raise
