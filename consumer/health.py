"""What the consumer reports about itself: database state, /metrics, /healthz, /readyz."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from consumer.metrics import ConsumerMetrics

# How often a backing-off worker looks whether another one has committed meanwhile.
PAUSE_SLICE_S = 0.1


class Health:
    """Shared by the worker threads: the database state the latest of them observed.

    The latest observation wins, not a vote: after an outage a worker can still be
    asleep in its backoff while the others have reconnected and drained the backlog,
    and readiness must not wait for the sleepiest thread to notice.
    """

    def __init__(self, metrics: ConsumerMetrics) -> None:
        self._up = False
        self._commits = 0
        self._lock = threading.Lock()
        self._metrics = metrics

    def database(self, up: bool) -> None:
        with self._lock:
            self._up = up
            self._metrics.database_up.set(1 if up else 0)

    def committed(self) -> None:
        """A commit is the proof that the database takes writes again."""
        with self._lock:
            self._up = True
            self._commits += 1
            self._metrics.database_up.set(1)

    def pause(self, seconds: float, stop: threading.Event) -> None:
        """Back off for ``seconds``, but wake early on a stop request or when another
        worker commits: its success means the outage is over for everyone."""
        with self._lock:
            seen = self._commits
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            stop.wait(min(remaining, PAUSE_SLICE_S))
            with self._lock:
                if self._commits != seen:
                    return

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._up


def serve(
    listen: tuple[str, int], registry: CollectorRegistry, health: Health
) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._answer(200, b"ok\n")
            elif path == "/readyz":
                if health.ready:
                    self._answer(200, b"ready\n")
                else:
                    self._answer(503, b"not ready: database unreachable\n")
            else:
                self._answer(404, b"not found\n")

        def _answer(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes every few seconds would drown the structured log

    server = ThreadingHTTPServer(listen, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
