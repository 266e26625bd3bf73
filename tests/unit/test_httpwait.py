"""Waiting for a just-started server to answer HTTP."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.servers import free_port
from trackbuf.httpwait import ProcessExited, wait_http


@pytest.fixture
def ready_after() -> Iterator[tuple[str, float]]:
    """A server whose /readyz answers 503 for its first 0.3 s, then 200."""
    started, delay = time.monotonic(), 0.3

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if time.monotonic() - started > delay else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/readyz", started + delay
    finally:
        server.shutdown()
        server.server_close()


def test_an_error_status_is_waited_out_like_no_answer(ready_after: tuple[str, float]) -> None:
    url, ready_at = ready_after
    wait_http(url, timeout=5)
    assert time.monotonic() >= ready_at


def test_a_process_that_exits_fails_the_wait_at_once() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    started = time.monotonic()
    with pytest.raises(ProcessExited, match="exited with 3"):
        wait_http(f"http://127.0.0.1:{free_port()}/healthz", [proc], timeout=30)
    assert time.monotonic() - started < 10


def test_nothing_listening_times_out() -> None:
    with pytest.raises(TimeoutError, match="did not answer"):
        wait_http(f"http://127.0.0.1:{free_port()}/healthz", timeout=0.3)
