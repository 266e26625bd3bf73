"""``trackbuf up``: the whole pipeline on one machine, for trying it and for development.

Uses ``TRACKBUF_DATABASE_URL`` and ``TRACKBUF_BEANSTALKD`` when given; otherwise starts
an embedded PostgreSQL (the ``pgserver`` wheel) and a local ``beanstalkd`` with its
binlog, both under the data dir, so events survive a restart of ``up``. Ingest and the
consumer run as child processes (``trackbuf ingest`` / ``trackbuf consume``), exactly as
they would in production. Ctrl-C or SIGTERM stops everything this command started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from trackbuf import httpwait, links
from trackbuf.settings import Settings, as_environ, env_name, parse_hostport
from trackbuf.tokens import Keyring, new_key

STARTUP_TIMEOUT_S = 30.0


class UpError(RuntimeError):
    pass


def run(settings: Settings, explicit: frozenset[str] = frozenset()) -> int:
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = _stop_on_signals()
    settings = replace(settings, data_dir=str(data_dir))
    if not settings.signing_keys:
        settings = replace(settings, signing_keys=_stored_key(data_dir))
    if "public_url" not in explicit:
        settings = replace(settings, public_url=f"http://{settings.listen}")
    with contextlib.ExitStack() as stack:
        if not settings.database_url:
            settings = replace(settings, database_url=stack.enter_context(_embedded_pg(data_dir)))
        if "beanstalkd" not in explicit:
            address = stack.enter_context(_local_beanstalkd(data_dir, settings.beanstalkd))
            settings = replace(settings, beanstalkd=address)
        env = {**os.environ, **as_environ(settings)}
        _trackbuf(["migrate"], env, check=True)
        stack.enter_context(_env_file(data_dir, settings))
        # Entered consumer first so the stack stops ingest first: it stops taking
        # requests and flushes into beanstalkd while the consumer still drains.
        consumer = stack.enter_context(_child(["consume"], env))
        children = [stack.enter_context(_child(["ingest"], env)), consumer]
        _wait_http(f"http://{settings.listen}/healthz", children)
        _banner(settings)
        while not stop() and all(child.poll() is None for child in children):
            time.sleep(0.2)
        failed = [c for c in children if c.poll() not in (None, 0)]
        print("trackbuf up: stopping", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _stop_on_signals() -> Any:
    stopped = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return lambda: stopped


def _stored_key(data_dir: Path) -> str:
    """A signing key kept in the data dir, so links printed earlier stay valid."""
    path = data_dir / "signing_keys"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(new_key("k1") + "\n")
    spec = path.read_text().strip()
    Keyring.parse(spec)
    return spec


ENV_FILE = "trackbuf.env"
# What other commands (`trackbuf events`, `link`, ...) need to find this instance.
SHARED = ("database_url", "beanstalkd", "tube", "signing_keys", "public_url", "metrics_listen")


@contextlib.contextmanager
def _env_file(data_dir: Path, settings: Settings) -> Iterator[None]:
    """Write ``<data dir>/trackbuf.env`` while up runs, so commands started from the same
    directory find its servers without exports; removed on stop so it never goes stale."""
    path = data_dir / ENV_FILE
    values = as_environ(settings)
    lines = [f"{env_name(name)}={values[env_name(name)]}" for name in SHARED]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def read_env_file(data_dir: str) -> dict[str, str]:
    path = Path(data_dir) / ENV_FILE
    if not path.is_file():
        return {}
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.startswith("TRACKBUF_"):
            values[name] = value
    return values


@contextlib.contextmanager
def _embedded_pg(data_dir: Path) -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pgserver warns about XDG_RUNTIME_DIR at import
        import pgserver

    # pgserver logs every initdb/pg_ctl command line and its whole output at INFO: a
    # screenful before the banner a newcomer is looking for. Its warnings still show.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    server = pgserver.get_server(  # type: ignore[attr-defined]
        data_dir / "postgres", cleanup_mode="stop"
    )
    try:
        yield str(server.get_uri("postgres"))
    finally:
        server._cleanup()  # stop it now rather than at interpreter exit


@contextlib.contextmanager
def _local_beanstalkd(data_dir: Path, wanted: str) -> Iterator[str]:
    binary = shutil.which("beanstalkd")
    if binary is None:
        raise UpError("beanstalkd is not installed: apt-get install -y beanstalkd")
    host, port = parse_hostport(wanted, env_name("beanstalkd"))
    if not _port_free(host, port):
        port = _free_port(host)
    binlog = data_dir / "binlog"
    binlog.mkdir(exist_ok=True)
    # -b: without a binlog every queued event dies with the process.
    # Own session: Ctrl-C reaches `up` alone, which then stops everything in order
    # (ingest, consumer, then the servers they need) instead of all at once.
    proc = subprocess.Popen(
        [binary, "-l", host, "-p", str(port), "-b", str(binlog), "-f", "0"],
        start_new_session=True,
    )
    try:
        _wait_tcp(host, port, proc)
        yield f"{host}:{port}"
    finally:
        _terminate(proc)


@contextlib.contextmanager
def _child(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "trackbuf", *args], env=env, start_new_session=True
    )
    try:
        yield proc
    finally:
        _terminate(proc)


def _trackbuf(args: list[str], env: dict[str, str], check: bool) -> None:
    subprocess.run([sys.executable, "-m", "trackbuf", *args], env=env, check=check)


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_tcp(host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UpError(f"beanstalkd exited with {proc.returncode}")
        if not _port_free(host, port):
            return
        time.sleep(0.05)
    raise UpError("beanstalkd did not start")


def _wait_http(url: str, children: list[subprocess.Popen[bytes]]) -> None:
    try:
        httpwait.wait_http(url, children, STARTUP_TIMEOUT_S)
    except httpwait.ProcessExited:
        raise UpError("a trackbuf process exited during startup") from None
    except TimeoutError:
        raise UpError(f"ingest did not answer {url}") from None


def _banner(settings: Settings) -> None:
    keyring = Keyring.parse(settings.signing_keys)
    pixel = links.open_url(settings.public_url, keyring, "welcome", "you@example.com")
    click = links.click_url(
        settings.public_url, keyring, "welcome", "you@example.com", "https://example.com/"
    )
    print(
        "\ntrackbuf is up\n"
        f"  ingest:     http://{settings.listen}  (/healthz /readyz /metrics)\n"
        f"  consumer:   http://{settings.metrics_listen}/metrics\n"
        f"  beanstalkd: {settings.beanstalkd}\n"
        f"  data dir:   {settings.data_dir}\n"
        f"  sample open pixel:  {pixel}\n"
        f"  sample click link:  {click}\n"
        "  try:  curl -s -o /dev/null -w '%{http_code}\\n' '<url>'   then: trackbuf events\n"
        "  Ctrl-C stops everything.\n",
        flush=True,
    )
