"""Run a command while every default address trackbuf knows is held by another listener.

``./dev test-busy`` uses it to show that the suite never depends on a default port being
free: ingest 8080, its admin 9107, the consumer's 9108, beanstalkd 11300 and
PostgreSQL 5432, on 127.0.0.1. A port some other server already holds stays held by it.

    python tests/ports_held.py ./dev test
"""

from __future__ import annotations

import socket
import subprocess
import sys

DEFAULT_PORTS = (8080, 9107, 9108, 11300, 5432)


def hold(ports: tuple[int, ...]) -> tuple[list[socket.socket], list[int]]:
    """Listeners on every port that is free; the ports someone else already holds."""
    held, taken = [], []
    for port in ports:
        sock = socket.socket()
        # Connections of an earlier server in TIME_WAIT must not make this bind fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            sock.close()
            taken.append(port)
            continue
        held.append(sock)
    return held, taken


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python tests/ports_held.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    held, taken = hold(DEFAULT_PORTS)
    print(f"ports_held: holding {[s.getsockname()[1] for s in held]}, "
          f"already taken by others {taken}", file=sys.stderr)  # fmt: skip
    try:
        return subprocess.call(argv)
    finally:
        for sock in held:
            sock.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
