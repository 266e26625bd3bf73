"""Wait for a process that was just started to answer HTTP.

One loop for every place that starts trackbuf processes and needs them serving before
it goes on: ``trackbuf up``, the benchmark runner and the tests.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from email.message import Message

POLL_S = 0.05


class ProcessExited(RuntimeError):
    """A process being waited for exited before ``url`` answered."""


class ForeignServer(TimeoutError):
    """Something answered ``url`` until the timeout, but never the server waited for."""


def wait_http(
    url: str,
    watch: Sequence[subprocess.Popen[bytes]] = (),
    timeout: float = 30.0,
    accept: Callable[[Message], bool] | None = None,
) -> None:
    """Return once ``url`` answers with a success (whose headers ``accept`` takes, if
    given); raise ProcessExited as soon as one of ``watch`` exits (no point waiting out
    the timeout for a crashed server), and TimeoutError after ``timeout`` seconds
    (ForeignServer when answers came, but none was accepted).

    An error status is waited out like no answer: /readyz answers 503 until the
    server is ready, and waiting for it is the point.
    """
    deadline = time.monotonic() + timeout
    answered = False
    while True:
        for proc in watch:
            if proc.poll() is not None:
                raise ProcessExited(f"{url}: {_name(proc)} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if accept is None or accept(response.headers):
                    return
                answered = True
        except urllib.error.HTTPError as exc:
            exc.close()
            answered = True
        except OSError:  # refused or timed out
            pass
        if time.monotonic() >= deadline:
            if answered and accept is not None:
                raise ForeignServer(f"{url} answered, but never as the server waited for")
            raise TimeoutError(f"{url} did not answer within {timeout:g} s")
        time.sleep(POLL_S)


def _name(proc: subprocess.Popen[bytes]) -> str:
    args = proc.args
    if isinstance(args, (list, tuple)):
        return " ".join(str(a) for a in args[:4])
    return str(args)
