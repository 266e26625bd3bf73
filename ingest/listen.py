"""Ingest's listening sockets: bound once, by the process that owns the port.

``trackbuf ingest --workers N`` binds the address in the supervisor and its workers
inherit the sockets (open file descriptors handed to each child), instead of every
worker binding the port with SO_REUSEPORT. Why: SO_REUSEPORT lets *any* process of the
same user join the port, so a second, unrelated ingest (another deployment, a stale
one) would silently take half the traffic; with one socket bound without it, the second
ingest's bind fails with "address in use" and it says so. It also keeps the port held
while a worker is replaced, and connections already queued on the socket are served by
the remaining workers instead of being reset with the dead worker's own socket. The
kernel still spreads connections: every worker waits on the same socket and whichever
is free accepts (measured here with a bare aiohttp handler on uvloop, two processes,
wrk -t2 -c64: the same requests/s as with SO_REUSEPORT, split evenly between them).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping, Sequence

from trackbuf.settings import SettingsError, env_name, flag_name, parse_hostport

# Set by the supervisor for its workers only: the inherited descriptors, comma-separated.
# Not a setting (nobody sets it by hand), hence the leading underscore.
FDS_VARIABLE = "_TRACKBUF_INGEST_LISTEN_FDS"
ADMIN_FDS_VARIABLE = "_TRACKBUF_INGEST_ADMIN_FDS"
BACKLOG = 1024


class ListenError(SettingsError):
    """The listen address cannot be bound; the CLI prints it and exits 2."""


def bind(listen: str, setting: str = "listen") -> list[socket.socket]:
    """Listening sockets for ``host:port``: one per address the host resolves to
    (``localhost`` may be both 127.0.0.1 and ::1), as asyncio's own server does.
    ``setting`` names the setting that moves the address, for the error message."""
    host, port = parse_hostport(listen, env_name(setting))
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(
            f"cannot listen on {listen}: {exc.strerror}{_move_hint(setting)}"
        ) from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # SO_REUSEADDR only skips TIME_WAIT after a restart; on Linux it never lets
            # two processes listen on one port. No SO_REUSEPORT: see the module doc.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ListenError(_bind_failure(listen, exc, setting)) from None
    return sockets


def _bind_failure(listen: str, exc: OSError, setting: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        why = "the address is already in use (another process, perhaps another ingest)"
    else:
        why = exc.strerror or str(exc)
    return f"cannot listen on {listen}: {why}{_move_hint(setting)}"


def _move_hint(setting: str) -> str:
    return f"; choose another address with {flag_name(setting)} or {env_name(setting)}"


def worker_environ(
    sockets: Sequence[socket.socket], admin: Sequence[socket.socket] = ()
) -> dict[str, str]:
    """What tells a worker process which inherited descriptors to serve: the public
    sockets, and the private admin ones (/metrics)."""
    environ = {FDS_VARIABLE: ",".join(str(sock.fileno()) for sock in sockets)}
    if admin:
        environ[ADMIN_FDS_VARIABLE] = ",".join(str(sock.fileno()) for sock in admin)
    return environ


def inherited(
    environ: Mapping[str, str] | None = None, variable: str = FDS_VARIABLE
) -> list[socket.socket] | None:
    """The sockets a supervisor handed to this worker (the public ones, or with
    ``ADMIN_FDS_VARIABLE`` the admin ones), or None when run on its own."""
    raw = (os.environ if environ is None else environ).get(variable)
    if not raw:
        return None
    return [socket.socket(fileno=int(fd)) for fd in raw.split(",")]
