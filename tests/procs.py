"""Run trackbuf commands as real processes, the way an operator does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from trackbuf.httpwait import wait_http
from trackbuf.settings import Settings, as_environ

ROOT = Path(__file__).resolve().parent.parent


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKBUF_")}
    env.update(as_environ(settings))
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT)
    return env


def trackbuf(
    settings: Settings, *args: str, timeout: float = 120, input: str | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "commands", *args],
        input=input,
        env=env_for(settings, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


# Every process a test starts; a fixture kills what is left when the test ends, so a
# failed assertion never leaves a server running into the next test.
LIVE: list[Process] = []


class Process:
    def __init__(self, settings: Settings, *args: str, log_path: Path | None = None) -> None:
        LIVE.append(self)
        self.args = args
        self.log_path = log_path
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "commands", *args],
                env=env_for(settings),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        finally:
            if log_path:
                out.close()  # type: ignore[union-attr]

    def wait_http(self, url: str, timeout: float = 20) -> None:
        wait_http(url, [self.proc], timeout)

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""


def start_ingest(settings: Settings, log_path: Path | None = None) -> Process:
    proc = Process(settings, "ingest", log_path=log_path)
    proc.wait_http(f"http://{settings.listen}/healthz")
    return proc
