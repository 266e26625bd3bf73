"""Simulated hosts for fault tests: Linux network namespaces on one bridge.

A ``Network`` is a Linux bridge in the root namespace plus one network namespace per
simulated host, each joined to the bridge by a veth pair and given its own address
on a private /24 (``10.77.<n>.0/24``, ``<n>`` free at creation). The bridge has the
subnet's first address, so the test process, outside every host, reaches all of
them the way a load balancer or a monitoring system would; hosts reach each other
through the bridge. Each host has its own loopback, ports and routing, so every
server listens on its host's address with its usual port.

What a test can do to a host or a process on it:

- ``HostProcess.kill()`` (kill -9), ``pause()``/``resume()`` (SIGSTOP/SIGCONT: a hung
  server whose TCP connections stay open), ``terminate()``;
- ``QueueServer.start()`` again after a kill: the same address and binlog directory,
  so the jobs it had acknowledged come back;
- ``Host.partition()``/``heal()``: the root end of the host's veth goes down and up.
  Nothing reaches the host or leaves it, and no RST is sent: open connections hang
  until their own timeouts, as behind a failed switch port;
- ``Host.delay()``: added latency and loss with ``tc netem``, when the kernel has
  ``sch_netem``. Without it the call raises ``NetemUnavailable``, saying so.

Names start with ``tbn<pid>`` (namespaces ``tbn<pid>-<host>``, bridge ``tbn<pid>b``,
veths ``tbn<pid>v<i>``, PostgreSQL data in ``/tmp/tbn<pid>-pg-*``), so parallel runs
never collide, and ``remove_leftovers()`` removes what a run that died without
cleaning up left behind (only runs whose process is gone). ``Network.close()`` kills
every process in every host namespace, then removes the namespaces (their veths go
with them) and the bridge; subnets are chosen free, so they never overlap either.

Needs root and iproute2 (``ip netns``); ``unavailable()`` says why not otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.servers import Postgres
from tests.procs import ROOT, env_for
from trackbuf import beanstalk_client
from trackbuf.httpwait import wait_http
from trackbuf.settings import Settings

PREFIX = "tbn"
_OWNED = re.compile(rf"^{PREFIX}(\d+)[-bvp]")
BEANSTALKD_PORT = 11300


class NetemUnavailable(RuntimeError):
    """Latency or loss was asked for, but the kernel has no netem qdisc."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why simulated hosts cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "simulated hosts need root (network namespaces, veths, a bridge)"
    if shutil.which("ip") is None:
        return "iproute2 (the ip command) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    added = _run("ip", "netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"ip netns add failed: {added.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(ns: str) -> None:
    """Kill every process in ``ns`` (stopped ones too), then delete it."""
    for _ in range(50):
        pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.1)
    _run("ip", "netns", "del", ns, check=False)


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines() if line]


def _links() -> list[str]:
    out = _run("ip", "-o", "link", "show").stdout.splitlines()
    return [line.split(":")[1].strip().split("@")[0] for line in out]


def remove_leftovers() -> list[str]:
    """Remove namespaces, veths and bridges of earlier runs whose process is gone;
    the names removed."""
    removed = []
    for ns in _namespaces():
        owner = _OWNED.match(ns)
        if owner and not _alive(int(owner.group(1))):
            _delete_namespace(ns)
            removed.append(ns)
    for link in _links():
        owner = _OWNED.match(link)
        if owner and not _alive(int(owner.group(1))):
            _run("ip", "link", "del", link, check=False)
            removed.append(link)
    for datadir in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-pg-*"):
        owner = _OWNED.match(datadir.name)
        if owner and not _alive(int(owner.group(1))):
            shutil.rmtree(datadir, ignore_errors=True)
            removed.append(str(datadir))
    return removed


def _free_subnet() -> str:
    """``10.77.<n>`` for an <n> no address on this machine uses yet."""
    used = _run("ip", "-4", "-o", "addr", "show").stdout
    start = os.getpid() % 250
    for step in range(250):
        prefix = f"10.77.{(start + step) % 250}"
        if f" {prefix}." not in used:
            return prefix
    raise RuntimeError("no free /24 left in 10.77.0.0/16")


def wait_tcp(address: str, port: int, timeout: float = 15, proc: HostProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive:
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode} before listening")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((address, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {address}:{port}")


@dataclass
class Host:
    net: Network
    name: str
    ns: str
    address: str
    veth: str  # the end in the root namespace, on the bridge

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def partition(self) -> None:
        """Cut the host off: nothing in or out, open connections hang (no RST)."""
        _run("ip", "link", "set", self.veth, "down")

    def heal(self) -> None:
        _run("ip", "link", "set", self.veth, "up")

    def delay(self, ms: float, loss_percent: float = 0.0) -> None:
        """Add latency (and loss) to everything the host sends, with tc netem."""
        reason = self.net.netem_missing()
        if reason:
            raise NetemUnavailable(reason)
        spec = ["delay", f"{ms}ms"] + (["loss", f"{loss_percent}%"] if loss_percent else [])
        _run(*self.command("tc", "qdisc", "replace", "dev", "eth0", "root", "netem", *spec))

    def clear_delay(self) -> None:
        _run(*self.command("tc", "qdisc", "del", "dev", "eth0", "root"), check=False)


class HostProcess:
    """One process started inside a host; its output goes to ``log_path``."""

    def __init__(
        self, host: Host, name: str, argv: list[str], log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.host, self.name, self.log_path = host, name, log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                host.command(*argv), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )
        host.net.processes.append(self)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9 (also of a stopped process)."""
        if self.alive:
            self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def terminate(self, timeout: float = 30) -> int:
        if self.alive:
            self.resume()
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class QueueServer:
    """beanstalkd on a host, bound to its address, with a binlog that outlives it."""

    def __init__(self, host: Host, binlog_dir: Path, port: int = BEANSTALKD_PORT) -> None:
        binary = shutil.which("beanstalkd")
        if binary is None:
            raise RuntimeError("beanstalkd is not installed: apt-get install -y beanstalkd")
        self.binary, self.host, self.port, self.binlog_dir = binary, host, port, binlog_dir
        binlog_dir.mkdir(parents=True, exist_ok=True)
        self.proc: HostProcess | None = None

    @property
    def address(self) -> str:
        return f"{self.host.address}:{self.port}"

    def start(self) -> QueueServer:
        argv = [self.binary, "-l", self.host.address, "-p", str(self.port),
                "-b", str(self.binlog_dir)]  # fmt: skip
        log = self.binlog_dir.parent / f"beanstalkd-{self.host.name}.log"
        self.proc = HostProcess(self.host, f"beanstalkd@{self.host.name}", argv, log)
        wait_tcp(self.host.address, self.port, proc=self.proc)
        return self

    @property
    def running(self) -> HostProcess:
        assert self.proc is not None and self.proc.alive, f"beanstalkd@{self.host.name} is down"
        return self.proc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def stats(self) -> dict[str, int]:
        """Server-wide counters (``cmd-put``, ...), read from outside the host."""
        address = (self.host.address, self.port)
        with beanstalk_client.connect(address, "default", False, 2) as client:
            return {k: v for k, v in client.stats().items() if isinstance(v, int)}

    def tube_stats(self, tube: str = "trackbuf-events") -> dict[str, int]:
        address = (self.host.address, self.port)
        with beanstalk_client.connect(address, "default", False, 2) as client:
            try:
                found = client.stats_tube(tube)
            except beanstalk_client.NotFound:
                return {"current-jobs-ready": 0, "current-jobs-reserved": 0, "cmd-put": 0}
        return {k: v for k, v in found.items() if isinstance(v, int)}


class HostPostgres(Postgres):
    """The test suite's throwaway PostgreSQL cluster, run inside a host: it listens on
    the host's address and lets every host of the subnet in (trust, as in tests)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        super().__init__()
        # Named after the run, so remove_leftovers() finds it after a crashed run.
        named = Path(tempfile.mkdtemp(prefix=f"{host.net.tag}-pg-"))
        os.rename(self.datadir, named)
        self.datadir = named
        with open(self.datadir / "postgresql.conf", "a") as conf:  # the last line wins
            conf.write(f"listen_addresses = '{host.address}'\n"
                       f"unix_socket_directories = '{self.datadir}'\n")  # fmt: skip
        with open(self.datadir / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {host.net.subnet} trust\n")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self._user:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        subprocess.run(self.host.command(*cmd), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)  # fmt: skip

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host.address}:{self.port}/{database}"


@dataclass
class Network:
    """A bridge and the hosts on it; ``close()`` removes everything."""

    workdir: Path
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    hosts: dict[str, Host] = field(default_factory=dict)
    processes: list[HostProcess] = field(default_factory=list)
    _netem: str | None = field(default=None, init=False)
    _netem_probed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.prefix = _free_subnet()
        self.subnet = f"{self.prefix}.0/24"
        self.gateway = f"{self.prefix}.1"
        self.bridge = f"{self.tag}b"
        _run("ip", "link", "add", self.bridge, "type", "bridge", "forward_delay", "0")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        host = Host(self, name, f"{self.tag}-{name}", f"{self.prefix}.{10 + index}",
                    f"{self.tag}v{index}")  # fmt: skip
        inner = f"{self.tag}p{index}"
        _run("ip", "netns", "add", host.ns)
        self.hosts[name] = host
        _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", inner)
        _run("ip", "link", "set", inner, "netns", host.ns)
        _run("ip", "link", "set", host.veth, "master", self.bridge)
        _run("ip", "link", "set", host.veth, "up")
        for step in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "set", inner, "name", "eth0"],
            ["ip", "addr", "add", f"{host.address}/24", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
        ):
            _run(*host.command(*step))
        return host

    def netem_missing(self) -> str | None:
        """Why latency and loss cannot be added here, or None when netem works."""
        if not self._netem_probed:
            self._netem_probed = True
            probe = next(iter(self.hosts.values()), None)
            if shutil.which("tc") is None:
                self._netem = "tc (iproute2) is not installed"
            elif probe is None:
                self._netem = "no host to probe netem on"
            else:
                added = _run(*probe.command("tc", "qdisc", "add", "dev", "eth0", "root",
                                            "netem", "delay", "0ms"), check=False)  # fmt: skip
                if added.returncode != 0:
                    self._netem = (
                        "tc netem is not available (kernel without sch_netem): "
                        f"{added.stderr.strip()}"
                    )
                else:
                    probe.clear_delay()
        return self._netem

    def trackbuf(self, host: Host, settings: Settings, *args: str, name: str = "") -> HostProcess:
        """``python -m commands <args>`` inside ``host``, configured by ``settings``."""
        name = name or f"{args[0]}@{host.name}"
        return HostProcess(host, name, [sys.executable, "-m", "commands", *args],
                           self.workdir / f"{name}.log", env_for(settings))  # fmt: skip

    def start_ingest(self, host: Host, settings: Settings, name: str = "") -> HostProcess:
        proc = self.trackbuf(host, settings, "ingest", name=name)
        wait_http(f"http://{settings.listen}/healthz", [proc.proc], 30)
        return proc

    def start_consumer(self, host: Host, settings: Settings, name: str = "") -> HostProcess:
        proc = self.trackbuf(host, settings, "consume", name=name)
        wait_http(f"http://{settings.metrics_listen}/healthz", [proc.proc], 30)
        return proc

    def heal_all(self) -> None:
        for host in self.hosts.values():
            host.heal()

    def stop_processes(self) -> None:
        while self.processes:
            self.processes.pop().kill()

    def close(self) -> None:
        self.stop_processes()
        for host in self.hosts.values():
            _delete_namespace(host.ns)
        _run("ip", "link", "del", self.bridge, check=False)
        self.hosts.clear()
