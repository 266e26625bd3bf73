"""Real servers on free ports, with stop/kill/restart: for tests and benchmarks.

No mocks: outages in tests are real processes being stopped and killed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from trackbuf import beanstalk_client


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (0 once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (nginx's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                # The command name may hold spaces and parentheses: split after the last ")".
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        this = int(stat.split("/")[2])
        if this == pid or int(fields[1]) == pid:  # fields[1] is the parent pid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on port {port}")


class Beanstalkd:
    """A beanstalkd with a binlog, so kill -9 and restart keep acknowledged jobs."""

    def __init__(self, binlog_dir: Path, *extra: str) -> None:
        binary = shutil.which("beanstalkd")
        if binary is None:
            raise RuntimeError("beanstalkd is not installed: apt-get install -y beanstalkd")
        self.binary = binary
        self.binlog_dir = binlog_dir
        self.extra = extra
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        binlog_dir.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Beanstalkd:
        cmd = [self.binary, "-l", "127.0.0.1", "-p", str(self.port), "-b", str(self.binlog_dir)]
        self.proc = subprocess.Popen([*cmd, *self.extra])
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def rss_bytes(self) -> int:
        assert self.proc is not None
        return rss_bytes(self.proc.pid)

    def client(self, tube: str = "trackbuf-events") -> beanstalk_client.Client:
        """The consumer's own client: the one beanstalkd protocol layer trackbuf has."""
        return beanstalk_client.connect(("127.0.0.1", self.port), tube)

    def stats(self) -> dict[str, int]:
        """The server-wide counters (``stats``): commands run, binlog indexes, limits."""
        with beanstalk_client.connect(("127.0.0.1", self.port), "default", watch=False) as client:
            return _numbers(client.stats())

    def tube_stats(self, tube: str = "trackbuf-events") -> dict[str, int]:
        with beanstalk_client.connect(("127.0.0.1", self.port), "default", watch=False) as client:
            try:
                return _numbers(client.stats_tube(tube))
            except beanstalk_client.NotFound:
                return {"current-jobs-ready": 0, "current-jobs-reserved": 0,
                        "current-jobs-buried": 0, "current-jobs-delayed": 0}  # fmt: skip


def _numbers(stats: dict[str, int | str]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if isinstance(v, int)}


def _pg_bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")


class Postgres:
    """A throwaway PostgreSQL cluster. As root, it runs as the ``postgres`` user,
    because initdb and postgres refuse to run as root."""

    def __init__(self, durable: bool = False) -> None:
        self.bindir = _pg_bindir()
        self.datadir = Path(tempfile.mkdtemp(prefix="trackbuf-pg-"))
        self.port = free_port()
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(self.datadir, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
            "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
        )  # fmt: skip
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.datadir}'\n"
                "max_connections = 200\nshared_buffers = 256MB\n"
            )
            if not durable:
                # Tests: a killed server still keeps its data (the OS page cache
                # survives a process crash); only an OS crash would lose it.
                conf.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self._user:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> Postgres:
        log = str(self.datadir / "server.log")
        self._run("pg_ctl", "-D", str(self.datadir), "-l", log, "-w", "-t", "30", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster and all its backends at once, as a crash would."""
        pid = int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        children = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        for victim in [pid, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()

    @property
    def pid(self) -> int:
        """The postmaster's pid: its children are the backends and background workers."""
        return int((self.datadir / "postmaster.pid").read_text().splitlines()[0])

    def destroy(self) -> None:
        if self.running:
            with contextlib.suppress(subprocess.CalledProcessError):
                self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)
