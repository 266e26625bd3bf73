"""Real servers for tests; shared with the benchmarks in loadtest/."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loadtest.servers import Beanstalkd, Postgres, free_port, rss_bytes, wait_port

__all__ = ["Beanstalkd", "Postgres", "free_port", "local_site", "rss_bytes", "wait_port"]


@contextlib.contextmanager
def local_site(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A small HTTP server on a free loopback port, serving ``handler``; its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
