"""Real servers for tests; shared with the benchmarks in loadtest/."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import greenstalk

from loadtest.servers import Beanstalkd, Postgres, free_port, rss_bytes, wait_port
from trackbuf import codec
from trackbuf.events import Event

__all__ = ["Beanstalkd", "Postgres", "free_port", "local_site", "rss_bytes", "take_in_order",
           "take_recipients", "taken_jobs", "wait_port"]  # fmt: skip


def taken_jobs(server: Beanstalkd, tube: str = "trackbuf-events") -> Iterator[list[Event]]:
    """The events of every job queued in ``tube``, one job at a time in the order a
    consumer gets them (oldest first); each job is deleted once read.

    Read with greenstalk, a client that shares no code with trackbuf's own protocol
    layer, so a bug there cannot hide what the server really holds."""
    with greenstalk.Client(("127.0.0.1", server.port), encoding=None, watch=tube) as client:
        while True:
            try:
                job = client.reserve(timeout=0)
            except greenstalk.TimedOutError:
                return
            yield codec.decode_job(bytes(job.body))
            client.delete(job)


def take_recipients(server: Beanstalkd, tube: str = "trackbuf-events") -> list[str]:
    """The recipient of every event queued in ``tube``, sorted; the jobs are deleted."""
    return sorted(take_in_order(server, tube))


def take_in_order(server: Beanstalkd, tube: str = "trackbuf-events") -> list[str]:
    """The recipient of every event queued in ``tube``, in the order a consumer gets
    them (oldest job first); the jobs are deleted."""
    return [event.recipient for job in taken_jobs(server, tube) for event in job]


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
