"""`trackbuf up` as a newcomer runs it: embedded PostgreSQL, local beanstalkd, real URLs."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import psutil
import pytest

from tests.servers import free_port

pytestmark = pytest.mark.acceptance
ROOT = Path(__file__).resolve().parents[2]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's 0700 tmp dir: the embedded PostgreSQL runs as its own user.
    path = Path(tempfile.mkdtemp(prefix="trackbuf-up-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_up_serves_signed_links_and_rows_appear(data_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKBUF_")}
    listen = f"127.0.0.1:{free_port()}"
    env.update(
        TRACKBUF_DATA_DIR=str(data_dir),
        TRACKBUF_LISTEN=listen,
        TRACKBUF_ADMIN_LISTEN=f"127.0.0.1:{free_port()}",
        TRACKBUF_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
        PYTHONPATH=str(ROOT),
    )
    # beanstalkd's default port taken, as Debian's package takes it: up moves off it
    # and says so (whoever holds it: this test, or a server already running there).
    # SO_REUSEADDR: an earlier beanstalkd's connections in TIME_WAIT must not make the
    # bind fail while nothing listens there.
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with contextlib.suppress(OSError):
        squatter.bind(("127.0.0.1", 11300))
        squatter.listen()
    with socket.create_connection(("127.0.0.1", 11300), timeout=5):
        pass  # held: by this test, or by a server already there
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "commands", "up"],
        env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        urls = read_banner(up)
        said = (tmp_path / "up.log").read_text()
        assert "trackbuf up: 127.0.0.1:11300 is taken by another server" in said, said
        with urllib.request.urlopen(urls["sample open pixel"], timeout=5) as response:
            assert response.status == 200 and response.read()[:6] == b"GIF89a"
        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as redirect:
            opener.open(urls["sample click link"], timeout=5)
        redirect.value.close()
        assert redirect.value.code == 302
        assert redirect.value.headers["Location"] == "https://example.com/"

        # `trackbuf events` finds the embedded database through the data dir.
        rows: list[str] = []
        deadline = time.monotonic() + 30
        while len(rows) < 2 and time.monotonic() < deadline:
            shown = subprocess.run(
                [sys.executable, "-m", "commands", "events"],
                env=env, capture_output=True, text=True, cwd=tmp_path, timeout=30,
            )  # fmt: skip
            assert shown.returncode == 0, shown.stderr
            rows = [line for line in shown.stdout.splitlines()[1:] if "\twelcome\t" in line]
            time.sleep(0.3)
        assert sorted(line.split("\t")[1] for line in rows) == ["click", "open"]
    finally:
        squatter.close()
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
        log.close()
        assert up.stdout is not None
        up.stdout.close()
    assert code == 0, (tmp_path / "up.log").read_text()
    assert not (data_dir / "trackbuf.env").exists()
    assert (data_dir / "binlog").is_dir() and any((data_dir / "binlog").iterdir())
    leftovers = subprocess.run(
        ["pgrep", "-f", f"beanstalkd.*{data_dir}"], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout == ""


def read_banner(up: subprocess.Popen[str]) -> dict[str, str]:
    urls: dict[str, str] = {}
    assert up.stdout is not None
    deadline = time.monotonic() + 90
    while len(urls) < 2 and time.monotonic() < deadline:
        line = up.stdout.readline()
        if not line:
            raise AssertionError(f"trackbuf up exited early with {up.wait()}")
        name, sep, value = line.strip().partition(":  ")
        if sep and name.startswith("sample"):
            urls[name] = value.strip()
    return urls


def up_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKBUF_")}
    env.update(
        TRACKBUF_DATA_DIR=str(data_dir),
        TRACKBUF_LISTEN=f"127.0.0.1:{free_port()}",
        TRACKBUF_ADMIN_LISTEN=f"127.0.0.1:{free_port()}",
        TRACKBUF_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
        PYTHONPATH=str(ROOT),
        COLUMNS="300",  # argparse would wrap --help lines at the terminal's width
    )
    env.update(extra)
    return env


def trackbuf(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "commands", *args],
        env=env, capture_output=True, text=True, cwd=cwd, timeout=timeout,
    )  # fmt: skip


class Healthy(http.server.BaseHTTPRequestHandler):
    """Some other server that happens to answer /healthz."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("setting", "flag"), [("TRACKBUF_LISTEN", "--listen"),
                          ("TRACKBUF_METRICS_LISTEN", "--metrics-listen")]
)  # fmt: skip
def test_up_refuses_an_address_in_use_before_starting_anything(
    data_dir: Path, tmp_path: Path, setting: str, flag: str
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    busy = f"127.0.0.1:{server.server_address[1]}"
    try:
        up = trackbuf("up", env=up_env(data_dir, **{setting: busy}), cwd=tmp_path, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert up.returncode == 2, up.stderr
    assert "Traceback" not in up.stderr
    assert busy in up.stderr and flag in up.stderr and setting in up.stderr
    assert "trackbuf is up" not in up.stdout
    assert not (data_dir / "postgres").exists()  # nothing was started


def test_up_reports_a_migrate_failure_without_a_traceback(data_dir: Path, tmp_path: Path) -> None:
    nowhere = f"postgresql://trackbuf@127.0.0.1:{free_port()}/trackbuf"
    up = trackbuf("up", env=up_env(data_dir, TRACKBUF_DATABASE_URL=nowhere), cwd=tmp_path)
    assert up.returncode != 0
    assert "Traceback" not in up.stderr, up.stderr
    assert "migrate" in up.stderr and "127.0.0.1" in up.stderr


def test_up_beside_operator_commands_and_killed(data_dir: Path, tmp_path: Path) -> None:
    env = up_env(data_dir)
    listen, metrics = env["TRACKBUF_LISTEN"], env["TRACKBUF_METRICS_LISTEN"]
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "commands", "up"],
        env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        read_banner(up)
        # Another directory, only TRACKBUF_DATA_DIR set: what an operator does.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        operator = {k: v for k, v in env.items() if k not in (
            "TRACKBUF_LISTEN", "TRACKBUF_METRICS_LISTEN")}  # fmt: skip

        # status finds up's ingest and consumer on their non-default addresses.
        status = trackbuf("status", "--json", "--interval", "0.2", env=operator, cwd=elsewhere)
        report = orjson.loads(status.stdout)
        # Both /metrics pages were read (None: unreachable); the consumer's database
        # state itself may not be known yet this early.
        assert report["spool_jobs"] is not None and report["database_up"] is not None, report

        # --help shows the values in force, read from up's env file, secrets masked.
        helped = trackbuf("link", "open", "--help", env=operator, cwd=elsewhere)
        assert f"now: http://{listen}]" in helped.stdout
        secret = (data_dir / "signing_keys").read_text().strip().partition(":")[2]
        assert "now: k1:***]" in helped.stdout and secret not in helped.stdout

        # A second up in the same data dir names the one that owns it.
        second = trackbuf("up", env=up_env(data_dir), cwd=elsewhere)
        assert second.returncode == 2
        assert f"another trackbuf up (pid {up.pid}) is using {data_dir}" in second.stderr
        assert "Traceback" not in second.stderr

        # SIGKILL: nothing up started may outlive it, and its ports come free.
        beanstalkd = dict(
            line.split("=", 1) for line in (data_dir / "trackbuf.env").read_text().splitlines()
            if line.startswith("TRACKBUF_")
        )["TRACKBUF_BEANSTALKD"]  # fmt: skip
        started = started_by(up.pid, data_dir)
        assert len(started) >= 4, started  # ingest, consumer, beanstalkd, postgres (+ helpers)
        up.kill()
        up.wait(10)
        _, alive = psutil.wait_procs(started, timeout=15)
        assert not alive, [(p.pid, p.info) for p in alive]
        for address in (listen, metrics, beanstalkd):
            host, _, port = address.rpartition(":")
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, int(port)))  # raises if anything still holds it
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        log.close()
        assert up.stdout is not None
        up.stdout.close()


def started_by(pid: int, data_dir: Path) -> list[psutil.Process]:
    """up's descendants, and the embedded postmaster with its backends (pg_ctl
    detaches it from up, so it is nobody's child but init's)."""
    procs = psutil.Process(pid).children(recursive=True)
    postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    procs += [psutil.Process(postmaster), *psutil.Process(postmaster).children(recursive=True)]
    for proc in procs:
        proc.info = {"cmdline": " ".join(proc.cmdline())[:100]}
    return procs
