"""``trackbuf up``: the whole pipeline on one machine, for trying it and for development.

Uses ``TRACKBUF_DATABASE_URL`` and ``TRACKBUF_BEANSTALKD`` when given; otherwise starts
an embedded PostgreSQL (the ``pgserver`` wheel) and a local ``beanstalkd`` with its
binlog, both under the data dir, so events survive a restart of ``up``. Ingest and the
consumer run as child processes (``trackbuf ingest`` / ``trackbuf consume``), exactly as
they would in production. Ctrl-C or SIGTERM stops everything this command started; so
does a ``kill -9`` of ``up`` (``trackbuf.lifeline``).

Before it starts anything, ``up`` locks the data dir (one ``up`` per dir) and checks
that the addresses it will listen on are free, so a clash is reported as such rather
than as whatever the server that lost the race prints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from trackbuf import envfile, httpwait, links
from trackbuf.instance import INSTANCE_ENV, INSTANCE_HEADER
from trackbuf.keys import load_keyring
from trackbuf.lifeline import Watchdog, die_with_parent
from trackbuf.redact import masked_dsn
from trackbuf.settings import Settings, as_environ, env_name, flag_name, parse_hostport
from trackbuf.tokens import Keyring, new_key

STARTUP_TIMEOUT_S = 30.0
LOCK_FILE = "up.lock"
# up gives its ingest a random instance id, which /healthz repeats in this header: the
# banner waits for *its* ingest, not for whatever else answers on that port.
# The addresses up's children listen on, with what a clash message calls them.
LISTENERS = (("listen", "ingest"), ("admin_listen", "ingest metrics"),
             ("metrics_listen", "consumer metrics"))  # fmt: skip


class UpError(RuntimeError):
    pass


def run(settings: Settings, explicit: frozenset[str] = frozenset()) -> int:
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = replace(settings, data_dir=str(data_dir))
    lock = lock_data_dir(data_dir)
    try:
        check_addresses(settings)
        pgdata = None if settings.database_url else data_dir / "postgres"
        watchdog = Watchdog(pgdata, data_dir / envfile.ENV_FILE, lock)
        try:
            return _run(settings, explicit)
        finally:
            watchdog.done()
    finally:
        os.close(lock)


def _run(settings: Settings, explicit: frozenset[str]) -> int:
    data_dir = Path(settings.data_dir)
    stop = _stop_on_signals()
    if not settings.signing_keys and not settings.signing_keys_file:
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
        code = _trackbuf(["migrate"], env)
        if code != 0:
            raise UpError(
                f"`trackbuf migrate` failed (exit {code}) on {masked_dsn(settings.database_url)}"
                f"; its message is above. Check {env_name('database_url')}."
            )
        stack.enter_context(_env_file(data_dir, settings))
        instance = uuid.uuid4().hex
        # Entered consumer first so the stack stops ingest first: it stops taking
        # requests and flushes into beanstalkd while the consumer still drains.
        consumer = stack.enter_context(_child(["consume"], env))
        ingest = stack.enter_context(_child(["ingest"], {**env, INSTANCE_ENV: instance}))
        children = [ingest, consumer]
        wait_own_ingest(settings.listen, instance, children)
        wait_consumer(settings.metrics_listen, children)
        _banner(settings)
        while not stop() and all(child.poll() is None for child in children):
            time.sleep(0.2)
        failed = [c for c in children if c.poll() not in (None, 0)]
        print("trackbuf up: stopping", file=sys.stderr, flush=True)
    return 1 if failed else 0


def lock_data_dir(data_dir: Path) -> int:
    """Hold ``<data dir>/up.lock`` (flock) for as long as the returned fd is open, so
    a second ``up`` on the same dir is told who owns it instead of colliding with it."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if owner.isdigit() and not envfile.owner_alive(int(owner), ""):
            # Killed: its watchdog holds the lock while it stops what that up started.
            raise UpError(
                f"the trackbuf up (pid {owner}) that used {data_dir} was killed and its "
                "servers are still stopping: try again in a few seconds"
            ) from None
        raise UpError(
            f"another trackbuf up (pid {owner}) is using {data_dir}: stop it first, or give "
            f"this one a data dir of its own with {flag_name('data_dir')} or "
            f"{env_name('data_dir')}"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def check_addresses(settings: Settings) -> None:
    """Every address up's children will listen on is free (and they are not one)."""
    seen: dict[str, str] = {}
    for name, what in LISTENERS:
        address = getattr(settings, name)
        moved = f"{flag_name(name)} or {env_name(name)}"
        if address in seen:
            raise UpError(
                f"{seen[address]} and {what} are both on {address}: move one with {moved}"
            )
        seen[address] = what
        host, port = parse_hostport(address, env_name(name))
        problem = _bind_problem(host, port)
        if problem == errno.EADDRINUSE:
            raise UpError(f"{address} is already in use ({what}); move it with {moved}")
        if problem:
            raise UpError(f"cannot listen on {address} ({what}): {os.strerror(problem)}; "
                          f"change it with {moved}")  # fmt: skip


def _bind_problem(host: str, port: int) -> int:
    """0 if a server could listen on host:port now, else the errno binding gives."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror:
        return errno.EADDRNOTAVAIL
    with socket.socket(family, kind, proto) as sock:
        # As the servers bind: SO_REUSEADDR, so connections in TIME_WAIT do not count.
        # Not SO_REUSEPORT: a listener left behind with it must count as a clash.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            return exc.errno or errno.EADDRINUSE
    return 0


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


# What other commands (`trackbuf events`, `link`, `status`, ...) need to find this instance.
SHARED = ("database_url", "beanstalkd", "tube", "signing_keys", "signing_keys_file",
          "public_url", "listen", "admin_listen", "metrics_listen")  # fmt: skip


@contextlib.contextmanager
def _env_file(data_dir: Path, settings: Settings) -> Iterator[None]:
    """Write ``<data dir>/trackbuf.env`` while up runs, so commands started from the same
    directory find its servers without exports; removed on stop. If up is killed, the
    watchdog removes it, and readers ignore a file whose owner is gone."""
    path = data_dir / envfile.ENV_FILE
    values = as_environ(settings)
    envfile.write(path, {env_name(name): values[env_name(name)] for name in SHARED})
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _embedded_pg(data_dir: Path) -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pgserver warns about XDG_RUNTIME_DIR at import
        import pgserver

    # pgserver logs every initdb/pg_ctl command line and its whole output at INFO: a
    # screenful before the banner a newcomer is looking for. Its warnings still show.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    pgdata = data_dir / "postgres"
    # pgserver stops the server when the last process in this list lets go; an up that
    # was killed stays listed for ever, and then no later up would stop it. The data
    # dir lock says no other up uses this server: start the list afresh.
    (pgdata / ".handle_pids.json").unlink(missing_ok=True)
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    except (subprocess.SubprocessError, OSError) as exc:
        raise UpError(f"the embedded PostgreSQL did not start ({exc}); see {pgdata}/log") from None
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
        taken, port = port, _free_port(host)
        # Said out loud: Debian's beanstalkd package runs a server on 11300, and a
        # command run away from this data dir would otherwise check that one instead.
        print(
            f"trackbuf up: {host}:{taken} is taken by another server (Debian's beanstalkd "
            f"package runs one there); up's own beanstalkd listens on {host}:{port}. "
            f"Commands run here find it through {data_dir / envfile.ENV_FILE}; elsewhere, "
            f"set {env_name('data_dir')}={data_dir} or {env_name('beanstalkd')}={host}:{port}",
            file=sys.stderr,
            flush=True,
        )
    binlog = data_dir / "binlog"
    binlog.mkdir(exist_ok=True)
    # -b: without a binlog every queued event dies with the process.
    # Own session: Ctrl-C reaches `up` alone, which then stops everything in order
    # (ingest, consumer, then the servers they need) instead of all at once.
    proc = subprocess.Popen(
        [binary, "-l", host, "-p", str(port), "-b", str(binlog), "-f", "0"],
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    try:
        _wait_tcp(host, port, proc, binlog)
        yield f"{host}:{port}"
    finally:
        _terminate(proc)


@contextlib.contextmanager
def _child(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "commands", *args],
        env=env,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    try:
        yield proc
    finally:
        _terminate(proc)


def _trackbuf(args: list[str], env: dict[str, str]) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "commands", *args], env=env, preexec_fn=die_with_parent()
    )
    return done.returncode


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


def _wait_tcp(host: str, port: int, proc: subprocess.Popen[bytes], binlog: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UpError(f"beanstalkd exited with {proc.returncode} (is another beanstalkd "
                          f"still using {binlog}?)")  # fmt: skip
        if not _port_free(host, port):
            return
        time.sleep(0.05)
    raise UpError("beanstalkd did not start")


def wait_own_ingest(
    listen: str,
    instance: str,
    children: list[subprocess.Popen[bytes]],
    timeout: float = STARTUP_TIMEOUT_S,
) -> None:
    """Until the ingest that up started answers /healthz with up's instance id.

    Another server answering on that address (one left running, or one that took the
    port after up checked it) is not up's ingest, and the banner would send the user
    to it."""
    url = f"http://{listen}/healthz"
    try:
        httpwait.wait_http(
            url, children, timeout, accept=lambda headers: headers.get(INSTANCE_HEADER) == instance
        )
    except httpwait.ProcessExited:
        raise UpError("a trackbuf process exited during startup; its message is above") from None
    except httpwait.ForeignServer:
        raise UpError(
            f"{listen} answers, but not as the ingest this up started: another server "
            f"holds that address; move ingest with {flag_name('listen')} or {env_name('listen')}"
        ) from None
    except TimeoutError:
        raise UpError(f"ingest did not answer {url}") from None


def wait_consumer(
    metrics_listen: str, children: list[subprocess.Popen[bytes]], timeout: float = STARTUP_TIMEOUT_S
) -> None:
    """Until the consumer answers /healthz: the banner sends the user to `trackbuf
    status`, which reads the consumer's /metrics, and on a loaded machine the consumer
    (loading its classification lists) can be seconds behind ingest."""
    url = f"http://{metrics_listen}/healthz"
    try:
        httpwait.wait_http(url, children, timeout)
    except httpwait.ProcessExited:
        raise UpError("a trackbuf process exited during startup; its message is above") from None
    except TimeoutError:
        raise UpError(f"the consumer did not answer {url}") from None


def _banner(settings: Settings) -> None:
    keyring = load_keyring(settings)
    pixel = links.open_url(settings.public_url, keyring, "welcome", "you@example.com")
    click = links.click_url(
        settings.public_url, keyring, "welcome", "you@example.com", "https://example.com/"
    )
    print(
        "\ntrackbuf is up\n"
        f"  ingest:     http://{settings.listen}  (/o/ /c/ /healthz /readyz /robots.txt)\n"
        f"  metrics:    http://{settings.admin_listen}/metrics  (ingest, private)\n"
        f"  consumer:   http://{settings.metrics_listen}/metrics\n"
        f"  beanstalkd: {settings.beanstalkd}\n"
        f"  data dir:   {settings.data_dir}\n"
        f"  sample open pixel:  {pixel}\n"
        f"  sample click link:  {click}\n"
        "  try:  curl -s -o /dev/null -w '%{http_code}\\n' '<url>'   then: trackbuf events\n"
        "  Ctrl-C stops everything.\n",
        flush=True,
    )
