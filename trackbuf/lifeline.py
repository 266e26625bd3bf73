"""What stops ``trackbuf up``'s servers when ``up`` itself is killed (``kill -9``, OOM).

Two ways, because the servers are started two ways:

* Processes ``up`` starts itself (beanstalkd, ingest, the consumer, ``migrate``) ask
  the kernel for SIGTERM when their parent dies (``PR_SET_PDEATHSIG``, Linux): SIGTERM,
  so ingest and the consumer still stop gracefully.
* The embedded PostgreSQL is started by ``pg_ctl``, which detaches it: it is nobody's
  child but init's. A watchdog process (``python -m trackbuf.lifeline``) holds the read
  end of a pipe whose write end only ``up`` holds. When ``up`` ends, the pipe reaches
  end of file; unless ``up`` said ``done`` first (it stopped everything itself), the
  watchdog stops the postmaster and removes ``trackbuf.env``. It also holds ``up``'s
  data-dir lock until it is finished, so no new ``up`` starts on a half-stopped dir.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from trackbuf import envfile

DONE = b"done\n"
_PR_SET_PDEATHSIG = 1
# PostgreSQL's "fast" shutdown (SIGINT), then "immediate" (SIGQUIT), then SIGKILL.
_PG_STOPS = ((signal.SIGINT, 5.0), (signal.SIGQUIT, 2.0), (signal.SIGKILL, 2.0))


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies; None
    where the kernel has no such request (not Linux).

    A ``preexec_fn`` is unsafe in a process with threads (it runs between fork and
    exec); ``up`` starts its children from its only thread."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def request() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request was in place
            os.kill(os.getpid(), signal.SIGTERM)

    return request


class Watchdog:
    """The ``up`` side of the watchdog process."""

    def __init__(self, pgdata: Path | None, env_file: Path, lock_fd: int) -> None:
        args = [sys.executable, "-m", "trackbuf.lifeline", "--env-file", str(env_file),
                "--owner", str(os.getpid())]  # fmt: skip
        if pgdata is not None:
            args += ["--pgdata", str(pgdata)]
        # Own session: a Ctrl-C meant for `up` must not stop the watchdog first.
        self._proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, pass_fds=(lock_fd,), start_new_session=True
        )

    def done(self) -> None:
        """Everything is stopped: the watchdog has nothing left to do."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(DONE)
            self._proc.stdin.close()
        except OSError:
            pass  # it died; nothing for it to do anyway
        self._proc.wait(10)


def stop_postmaster(pgdata: Path) -> None:
    """Stop the PostgreSQL server running on ``pgdata``, if any."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return  # none running: postgres removes the file when it stops
    if not _is_postgres(pid):
        return  # a stale file, and the pid belongs to someone else by now
    for signum, wait_s in _PG_STOPS:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


def _is_postgres(pid: int) -> bool:
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return _alive(pid)  # no /proc: trust the file


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Signalled and exited, but not reaped yet: init reaps it soon; it holds nothing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trackbuf.lifeline")
    parser.add_argument("--env-file", type=Path, required=True)
    parser.add_argument("--owner", type=int, required=True)
    parser.add_argument("--pgdata", type=Path)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    said = sys.stdin.buffer.read()  # returns when every holder of the write end is gone
    if said == DONE:
        return 0
    if args.pgdata is not None:
        stop_postmaster(args.pgdata)
        # up may have died while pg_ctl was still starting the server: look once more.
        time.sleep(1.0)
        stop_postmaster(args.pgdata)
    # No newer `up` can have written the file meanwhile: this process holds the lock.
    _remove_if_owned(args.env_file, args.owner)
    return 0


def _remove_if_owned(path: Path, owner: int) -> None:
    try:
        text = path.read_text()
    except OSError:
        return
    if f"{envfile.OWNER_PID}={owner}\n" in text:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
