"""``trackbuf ingest``: serve the app, one process or several on one port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import multiprocess

from ingest.app import Ingest
from ingest.metrics import IngestMetrics
from trackbuf.log import kv
from trackbuf.settings import Settings, as_environ

log = logging.getLogger("trackbuf.ingest")

# What the stop may take beyond shutdown_timeout: closing sockets and files.
STOP_GRACE_S = 0.5


def run(settings: Settings) -> int:
    if settings.workers > 1:
        return _run_workers(settings)
    _use_uvloop()
    return asyncio.run(serve(settings))


class ErrorAnswers(logging.Filter):
    """Counts, and cleans up, the error answers aiohttp makes itself.

    aiohttp logs each one as "Error handling request from <ip>": the 400 for a request
    it cannot parse and the 500 for a handler that raised (ingest's own handlers answer
    200, 302, 404 or 405; only /readyz answers 503, on purpose). Counting them here,
    in trackbuf_ingest_http_errors_total, costs nothing per request; an access logger
    would see them too but runs on every answer (~8% of a pixel's CPU, measured). The
    client's address is dropped; a parse error's traceback says nothing and goes, a
    handler's stays (one escaped exc= field). A first request that is not HTTP at all
    (TLS to a plain port, a scanner) is logged at debug level by aiohttp: not counted.
    """

    def __init__(self, metrics: IngestMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Error handling request"):
            return True
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            status = error.code or 400
            record.exc_info = None
        elif error is None:
            status = 504  # aiohttp logs its answer to a handler that timed out without one
        else:
            status = 500
        self._metrics.http_error(status)
        event = "bad_request" if status < 500 else "request_error"
        record.msg, record.args = kv(event, status=status, error=type(error).__name__), ()
        return True


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``), then shut down gracefully.

    Graceful: stop accepting, let in-flight requests finish, flush the enqueue task;
    all bounded by ``shutdown_timeout``.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ingest = Ingest(settings)
    loop.add_signal_handler(signal.SIGHUP, ingest.reload_keys)  # key rotation, no restart
    errors = ErrorAnswers(ingest.metrics)
    logging.getLogger("aiohttp.server").addFilter(errors)
    try:
        return await _serve(settings, stop, ingest)
    finally:
        logging.getLogger("aiohttp.server").removeFilter(errors)


async def _serve(settings: Settings, stop: asyncio.Event, ingest: Ingest) -> int:
    host, port = settings.listen.rsplit(":", 1)
    await ingest.start()
    runner = web.ServerRunner(
        web.Server(ingest.handle, access_log=None),  # a line per pixel costs more than it
        shutdown_timeout=settings.shutdown_timeout,
    )
    await runner.setup()
    # reuse_port lets several worker processes share the port (the kernel balances).
    site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=True, backlog=1024)
    await site.start()
    log.info(kv("ingest_listening", listen=settings.listen, pid=os.getpid()))
    await stop.wait()
    log.info(kv("ingest_stopping", pid=os.getpid()))
    clock = ingest.shutdown
    clock.start(settings.shutdown_timeout)
    try:
        # aiohttp waits shutdown_timeout for in-flight requests and then as long again
        # for the ones it could not finish (a handler waiting for a hung beanstalkd
        # ignores that second stage), so the whole stop gets its own bound.
        async with asyncio.timeout(settings.shutdown_timeout + STOP_GRACE_S):
            await runner.cleanup()
            await ingest.close()  # after the last request: flush what they handed over
    except TimeoutError:
        # Only unanswered requests are left behind: nothing acknowledged is lost.
        log.error(kv("ingest_stop_timeout", timeout_s=settings.shutdown_timeout))
        return 1
    log.info(kv("ingest_stopped", pid=os.getpid(), clean=clock.clean))
    return 0 if clock.clean else 1


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _run_workers(settings: Settings) -> int:
    """Start ``workers`` single-process servers on the same port and supervise them.

    The kernel spreads connections across them (SO_REUSEPORT). Their metrics go to a
    shared directory (prometheus-client multiprocess mode), so any one of them answers
    /metrics with the totals of all. A worker that dies is replaced; its spool is
    claimed and replayed by its replacement.
    """
    metrics_dir = Path(settings.data_dir) / "ingest-metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counters restart with the processes
    metrics_dir.mkdir(parents=True)
    env = {
        **os.environ,
        **as_environ(settings),
        "TRACKBUF_WORKERS": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    cmd = [sys.executable, "-m", "trackbuf", "ingest"]
    children = [subprocess.Popen(cmd, env=env) for _ in range(settings.workers)]
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    def reload_keys(signum: int, frame: object) -> None:
        # SIGHUP re-reads the signing keys file in each worker; it stops nothing.
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGHUP, reload_keys)
    codes: dict[int, int] = {}
    while len(codes) < len(children):
        for i, child in enumerate(children):
            code = child.poll()
            if code is None or i in codes:
                continue
            multiprocess.mark_process_dead(child.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
            if not stopping:
                log.error(kv("ingest_worker_died", pid=child.pid, code=code))
                time.sleep(0.5)  # a worker that dies at once must not spin the CPU
            if stopping:  # also when SIGTERM arrived during that pause
                codes[i] = code
            else:
                children[i] = subprocess.Popen(cmd, env=env)
        time.sleep(0.1)
    return max(codes.values(), key=abs)
