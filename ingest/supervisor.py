"""The ``trackbuf ingest --workers N`` supervisor: start N workers, replace any that
dies, and on SIGTERM/SIGINT stop them all and report how the stop went.

Exit code: 0 when every worker stopped cleanly, 1 when one did not (it ran out of
``shutdown_timeout``, crashed while stopping, or had to be killed because it did not
exit in time). A worker that died while running was replaced and logged
(``event=ingest_worker_died``); the exit code describes the stop.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence

from trackbuf.log import kv

log = logging.getLogger("trackbuf.ingest")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESTART_DELAY_S = 0.5  # a worker that dies at once must not spin the CPU
POLL_S = 0.1
# Beyond a worker's own bound on its stop: starting or leaving the interpreter.
EXIT_MARGIN_S = 3.0
# What cli.main returns on a KeyboardInterrupt (SIGINT before serve() took the signal).
INTERRUPTED = 130


def stopped_cleanly(code: int) -> bool:
    """Whether a worker's exit code, after it was asked to stop, means a clean stop.

    A worker asked to stop while still starting (importing, before it handles the
    signal itself) dies of that signal or, for SIGINT, exits 130. It had not accepted
    a connection or taken a spool file yet, so nothing was lost: clean.
    """
    return code in (0, INTERRUPTED, *(-sig for sig in STOP_SIGNALS))


Worker = subprocess.Popen[bytes]


class Supervisor:
    def __init__(
        self,
        spawn: Callable[[], Worker],
        count: int,
        stop_timeout: float,
        reaped: Callable[[int], None] = lambda pid: None,
        listeners: Sequence[socket.socket] = (),
    ) -> None:
        """``spawn`` starts one worker; ``stop_timeout`` is how long a worker may take to
        stop on its own; ``reaped(pid)`` runs once per worker that exited; the
        ``listeners`` (shared with the workers) are closed when the stop begins, so the
        port is released as soon as the workers close their copies."""
        self._spawn = spawn
        self._slots: list[Worker | None] = [None] * count
        self._stop_timeout = stop_timeout
        self._reaped = reaped
        self._listeners = listeners
        self._stop_signal: int | None = None

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_reload)
        try:
            for slot in range(len(self._slots)):
                if self._stop_signal is None:
                    self._start(slot)
            while self._stop_signal is None:
                self._replace_dead()
                time.sleep(POLL_S)
            return self._stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        # Python runs this between two bytecodes of the main loop, so at any point of
        # it, in particular while _start() is inside spawn(). A worker being spawned
        # right now is not in _slots yet: _start() hands it the signal itself.
        self._stop_signal = signum
        for worker in self._slots:
            if worker is not None:
                worker.send_signal(signum)  # a no-op for a worker already reaped

    def _on_reload(self, signum: int, frame: object) -> None:
        # SIGHUP re-reads the signing keys file in each worker; it stops nothing. A
        # worker spawned right now reads the file as it starts, so it needs no signal.
        for worker in self._slots:
            if worker is not None:
                worker.send_signal(signum)

    def _start(self, slot: int) -> None:
        worker = self._spawn()
        self._slots[slot] = worker
        # A stop handled before the line above did not reach this worker: forward it.
        # (One handled after it did; a second stop signal to a worker is harmless.)
        if self._stop_signal is not None:
            worker.send_signal(self._stop_signal)

    def _replace_dead(self) -> None:
        for slot, worker in enumerate(self._slots):
            if worker is None or worker.poll() is None:
                continue
            self._slots[slot] = None  # dead: nothing to signal, nothing to wait for
            self._reaped(worker.pid)
            log.error(kv("ingest_worker_died", pid=worker.pid, code=worker.returncode))
            self._pause(RESTART_DELAY_S)
            if self._stop_signal is not None:
                return  # a stop came during the pause: replace nobody
            self._start(slot)

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._stop_signal is None and time.monotonic() < deadline:
            time.sleep(min(POLL_S, seconds))

    def _stop(self) -> int:
        for sock in self._listeners:
            sock.close()
        deadline = time.monotonic() + self._stop_timeout + EXIT_MARGIN_S
        pending = [worker for worker in self._slots if worker is not None]
        clean = True
        while pending:
            for worker in [w for w in pending if w.poll() is not None]:
                pending.remove(worker)
                self._reaped(worker.pid)
                code = worker.returncode
                if not stopped_cleanly(code):
                    clean = False
                    log.error(kv("ingest_worker_stop_failed", pid=worker.pid, code=code))
            if pending and time.monotonic() > deadline:
                for worker in pending:
                    log.error(kv("ingest_worker_killed", pid=worker.pid, reason="stop_timeout"))
                    worker.kill()
                    worker.wait()
                    self._reaped(worker.pid)
                return 1
            time.sleep(POLL_S)
        return 0 if clean else 1
