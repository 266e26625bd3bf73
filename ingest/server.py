"""``trackbuf ingest``: serve the app, one process or several on one port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import multiprocess

from ingest import listen
from ingest.app import Ingest
from ingest.fastpath import FastServer
from ingest.metrics import IngestMetrics
from ingest.supervisor import Supervisor
from trackbuf.log import kv
from trackbuf.settings import Settings, as_environ

log = logging.getLogger("trackbuf.ingest")

# What the stop may take beyond shutdown_timeout: closing sockets and files.
STOP_GRACE_S = 0.5
# Set for the workers of a supervisor (not a setting): its pid, which they watch.
SUPERVISOR_PID_VARIABLE = "_TRACKBUF_INGEST_SUPERVISOR_PID"
SUPERVISOR_CHECK_S = 0.5


def run(settings: Settings, worker_argv: Sequence[str]) -> int:
    """Exit code: 0 after a clean stop, 1 when the stop was not clean (see
    ``serve`` and ingest/supervisor.py); a listen address that cannot be bound raises
    ``ListenError`` before anything starts (the CLI exits 2). ``worker_argv`` starts one
    worker when ``settings.workers`` > 1: the command line is its caller's to know, so
    ingest depends on no command-line package."""
    listeners = listen.inherited()  # a worker of a supervisor: its sockets
    admin = listen.inherited(variable=listen.ADMIN_FDS_VARIABLE) or []
    if listeners is None:
        listeners = listen.bind(settings.listen)
        admin = listen.bind(settings.admin_listen, "admin_listen")
        if settings.workers > 1:
            return _run_workers(settings, listeners, admin, worker_argv)
    _use_uvloop()
    return asyncio.run(serve(settings, listeners, admin))


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


async def serve(
    settings: Settings,
    listeners: list[socket.socket],
    admin: list[socket.socket],
    stop: asyncio.Event | None = None,
) -> int:
    """Serve the public sockets (pixels, redirects, health) and the private admin ones
    (/metrics) until SIGTERM/SIGINT (or ``stop``), then shut down gracefully.

    Graceful: stop accepting, let in-flight requests finish, flush the enqueuer;
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
        return await _serve(settings, listeners, admin, stop, ingest)
    finally:
        logging.getLogger("aiohttp.server").removeFilter(errors)


async def _serve(
    settings: Settings,
    listeners: list[socket.socket],
    admin: list[socket.socket],
    stop: asyncio.Event,
    ingest: Ingest,
) -> int:
    await ingest.start()
    # No access log: a line per pixel costs more than it tells.
    server = (
        FastServer(ingest, access_log=None)  # pixels and redirects without aiohttp's machinery
        if settings.fast_path
        else web.Server(ingest.handle, access_log=None)
    )
    runner = web.ServerRunner(server, shutdown_timeout=settings.shutdown_timeout)
    await runner.setup()
    for sock in listeners:
        await web.SockSite(runner, sock, backlog=listen.BACKLOG).start()
    # /metrics on its own private address: it tells the world about traffic and
    # outages, and scrapes must not compete with pixels for the public listener.
    admin_runner = web.ServerRunner(web.Server(ingest.handle_admin, access_log=None))
    await admin_runner.setup()
    for sock in admin:
        await web.SockSite(admin_runner, sock, backlog=listen.BACKLOG).start()
    log.info(kv("ingest_listening", listen=settings.listen, admin=settings.admin_listen,
                pid=os.getpid()))  # fmt: skip
    supervisor = os.environ.get(SUPERVISOR_PID_VARIABLE)
    watch = asyncio.create_task(_watch_supervisor(int(supervisor), stop)) if supervisor else None
    await stop.wait()
    if watch is not None:
        watch.cancel()
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
            await admin_runner.cleanup()
    except TimeoutError:
        # Only unanswered requests are left behind: nothing acknowledged is lost.
        log.error(kv("ingest_stop_timeout", timeout_s=settings.shutdown_timeout))
        return 1
    log.info(kv("ingest_stopped", pid=os.getpid(), clean=clock.clean))
    return 0 if clock.clean else 1


async def _watch_supervisor(pid: int, stop: asyncio.Event) -> None:
    # A supervisor killed with SIGKILL cannot stop its workers: they stop by themselves
    # instead of holding the port (and their spool files) with nobody to stop them.
    while os.getppid() == pid:
        await asyncio.sleep(SUPERVISOR_CHECK_S)
    log.error(kv("ingest_supervisor_gone", supervisor=pid, pid=os.getpid()))
    stop.set()


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _run_workers(
    settings: Settings,
    listeners: list[socket.socket],
    admin: list[socket.socket],
    worker_argv: Sequence[str],
) -> int:
    """Start ``workers`` single-process servers on the supervisor's sockets and
    supervise them (ingest/supervisor.py).

    Every worker serves the same inherited sockets (ingest/listen.py says why not
    SO_REUSEPORT). Their metrics go to a shared directory (prometheus-client
    multiprocess mode), so any one of them answers /metrics with the totals of all. A
    worker that dies is replaced; its spool is claimed and replayed by its replacement.
    """
    metrics_dir = Path(settings.data_dir) / "ingest-metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counters restart with the processes
    metrics_dir.mkdir(parents=True)
    env = {
        **os.environ,
        **as_environ(settings),
        **listen.worker_environ(listeners, admin),
        SUPERVISOR_PID_VARIABLE: str(os.getpid()),
        "TRACKBUF_WORKERS": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    cmd = list(worker_argv)
    fds = [sock.fileno() for sock in (*listeners, *admin)]

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, env=env, pass_fds=fds)

    def reaped(pid: int) -> None:
        multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]

    supervisor = Supervisor(
        spawn,
        settings.workers,
        stop_timeout=settings.shutdown_timeout + STOP_GRACE_S,
        reaped=reaped,
        listeners=[*listeners, *admin],
    )
    return supervisor.run()
