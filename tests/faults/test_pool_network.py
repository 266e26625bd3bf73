"""A beanstalkd pool across simulated hosts: servers die, hang and drop off the network.

Topology (tests/netns.py): two ingest hosts, three queue hosts (one beanstalkd each),
one consumer host (two consumer processes where a scenario needs them) and a database
host. ``TRACKBUF_BEANSTALKD`` lists the three servers. The load comes from outside all
hosts, paced, spread over both ingests, and every acknowledged request is recorded.

Every scenario asserts what an operator of a pool expects while at least one server
accepts puts:

- every acknowledged event stored exactly once (nothing lost, duplicated, stray, or
  in dead_letters), and no request failed;
- neither ingest's spool touched (no event counted ``outcome="spooled"``);
- no answer held anywhere near a stuck put: not one ingest answer over 1 s (20x the
  50 ms goal, 4x the stall bound), and where a server is killed (an error at once, no
  stall to wait out), not one over 0.25 s around the fault.

The 50 ms p99 is a goal, not a verdict: it is printed (the driver's, as a client sees
it, beside the ingests' own) and measured on a quiet machine by the benchmarks. On a
machine busy with other work the ingests and the driver wait for CPU and pass 50 ms
without any fault; the bounds above hold on a machine twice as slow with a core busy.

The fault always hits the first server of the list. A server that is killed and not
restarted keeps what it acknowledged in its binlog, out of reach: the scenarios bring
it back (same address, same binlog) before counting rows.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.utils import floatToGoString

from ingest.putter import PUT_STALL_S
from loadtest.bench import histogram_quantile, scrape
from tests import netns
from tests.conftest import KEYS, TEMPLATE, _migrate_template, new_database, run
from tests.load import Load, LoadResult, audit_until_settled
from tests.netns import Host, HostPostgres, HostProcess, NetemUnavailable, Network, QueueServer
from trackbuf import metric_names as names
from trackbuf import settings as tsettings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.faults

HOSTS = ("db", "q1", "q2", "q3", "i1", "i2", "c1")
RATE = 250  # requests/s, over both ingests
LOAD_S = 12
GOAL_S = 0.050  # a healthy answer; printed, measured by the benchmarks
# Asserted from ingest's own histogram (bucket bounds in ingest/metrics.py): no answer
# over ANY_BOUND_S anywhere, none over FAULT_BOUND_S around a kill.
ANY_BOUND_S = 1.0
FAULT_BOUND_S = 0.25
# After a fault, how long its cost may take to show: a lost server's put in flight fails
# at once and is put again elsewhere; its reconnect attempts follow every 0.5 s.
FAULT_WINDOW_S = 2.0
INGEST_PORT, ADMIN_PORT, CONSUMER_PORT = 8080, 9107, 9108


@pytest.fixture(scope="module")
def hosts(network: Network) -> dict[str, Host]:
    return {name: network.add_host(name) for name in HOSTS}


@pytest.fixture(scope="module")
def db(hosts: dict[str, Host]) -> Iterator[HostPostgres]:
    server = HostPostgres(hosts["db"]).start()
    try:
        run(_migrate_template(server.dsn(), server.dsn(TEMPLATE)))
        yield server
    finally:
        server.destroy()


@dataclass
class Cluster:
    net: Network
    database_url: str
    queues: list[QueueServer] = field(default_factory=list)
    ingests: list[tuple[HostProcess, tsettings.Settings]] = field(default_factory=list)
    consumers: list[HostProcess] = field(default_factory=list)
    # The ingests' request histogram after the warm-up: the scenario's answers are what
    # it gained since.
    warm_buckets: dict[str, float] = field(default_factory=dict)
    watch: SlowWatch | None = None

    @property
    def bases(self) -> list[str]:
        return [f"http://{s.listen}" for _, s in self.ingests]

    def load(self, keyring: Keyring, campaign: str, seconds: float = LOAD_S) -> Load:
        self.watch = SlowWatch(self)
        return Load(self.bases, keyring, campaign, count=int(RATE * seconds), rate=RATE).start()


@pytest.fixture
def cluster(
    network: Network, hosts: dict[str, Host], db: HostPostgres, tmp_path: Path
) -> Iterator[Callable[..., Cluster]]:
    """Starts this test's servers on the module's hosts: fresh binlogs, spools and
    database. Whatever the test did, its partitions are healed and its processes
    killed when it ends."""

    def start(queues: int = 3, ingests: int = 2, consumers: int = 1) -> Cluster:
        c = Cluster(network, new_database(db))
        for n in range(1, queues + 1):
            c.queues.append(QueueServer(hosts[f"q{n}"], tmp_path / f"binlog-q{n}").start())
        pool = ",".join(q.address for q in c.queues)

        def settings(host: Host, **extra: object) -> tsettings.Settings:
            base: dict[str, object] = {
                "database_url": c.database_url, "beanstalkd": pool, "signing_keys": KEYS,
                "listen": f"{host.address}:{INGEST_PORT}",
                "public_url": f"http://{host.address}:{INGEST_PORT}",
                "admin_listen": f"{host.address}:{ADMIN_PORT}",
                "metrics_listen": f"{host.address}:{CONSUMER_PORT}",
                "spool_dir": str(tmp_path / f"spool-{host.name}"),
                "threads": 2, "linger_ms": 50, "shutdown_timeout": 10.0,
            }  # fmt: skip
            return tsettings.load({}, overrides={**base, **extra})

        for n in range(1, consumers + 1):
            port = f"{hosts['c1'].address}:{CONSUMER_PORT + n - 1}"
            c.consumers.append(network.start_consumer(
                hosts["c1"], settings(hosts["c1"], metrics_listen=port), name=f"consume-{n}@c1"
            ))  # fmt: skip
        for n in range(1, ingests + 1):
            s = settings(hosts[f"i{n}"])
            c.ingests.append((network.start_ingest(hosts[f"i{n}"], s), s))
        for proc, s in c.ingests:
            wait_connected(proc, s)
        warm_up(c)
        return c

    try:
        yield start
    finally:
        network.heal_all()
        network.stop_processes()


def warm_up(c: Cluster) -> None:
    """A few events through every ingest, stored before the measured load starts: the
    first ones pay for imports, connections and the consumer loading its classifier
    rules, which on two shared cores made the first second of every scenario slow
    enough to move the p99 with no fault at all."""
    result = Load(c.bases, Keyring.parse(KEYS), "warmup", count=100, rate=100).start().wait()
    audit = audit_until_settled(c.database_url, "warmup", result.acked, timeout=30)
    assert audit.lost == 0 and not result.failed, f"warm-up: {audit}"
    c.warm_buckets = ingest_buckets(c)


def wait_connected(proc: HostProcess, settings: tsettings.Settings, timeout: float = 15) -> None:
    """Until ingest holds a beanstalkd connection: before that, events go to the spool."""
    deadline = time.monotonic() + timeout
    while metric(settings, names.INGEST_BEANSTALKD_UP) < 1:
        assert time.monotonic() < deadline, f"{proc.name} never connected:\n{proc.log()}"
        time.sleep(0.05)


def metric(settings: tsettings.Settings, name: str, label: str = "") -> float:
    """Sum of an ingest's samples of ``name`` whose labels contain ``label``."""
    return sum(
        value
        for key, value in scrape(settings.admin_listen).items()
        if key.split("{", 1)[0] == name and label in key
    )


def ingest_buckets(c: Cluster) -> dict[str, float]:
    """The ingests' request histogram (all routes, both ingests), bucket by bucket.
    Read straight off the page's lines rather than through the exposition parser:
    ``SlowWatch`` reads it four times a second from the load driver's process, and
    must not take the driver's CPU."""
    name = names.INGEST_REQUEST_DURATION
    buckets: dict[str, float] = {}
    for _, s in c.ingests:
        with urllib.request.urlopen(f"http://{s.admin_listen}/metrics", timeout=5) as page:
            lines = page.read().decode().splitlines()
        for line in lines:
            if line.startswith(f"{name}_bucket{{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                merged = f'{name}_bucket{{le="{le}"}}'
                buckets[merged] = buckets.get(merged, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def ingest_side(c: Cluster) -> tuple[float, int, int]:
    """p99 of the answers as the ingests measured them since the warm-up, and how many
    took longer than the 50 ms goal and than ``ANY_BOUND_S``: set beside the driver's
    figures, they tell a slow ingest from a load driver starved of CPU."""
    now = ingest_buckets(c)
    p99 = histogram_quantile(0.99, c.warm_buckets, now, names.INGEST_REQUEST_DURATION)
    return p99, slow_count(c, now, GOAL_S), slow_count(c, now, ANY_BOUND_S)


def slow_count(c: Cluster, buckets: dict[str, float], over_s: float) -> int:
    """Answers over ``over_s`` (a bucket bound of the histogram) since the warm-up."""
    name = names.INGEST_REQUEST_DURATION
    slow = 0.0
    # The label as the client library writes it ("1.0", "0.25"); a missing bucket
    # is an error, never a silent zero.
    for le, sign in (("+Inf", 1), (floatToGoString(over_s), -1)):
        key = f'{name}_bucket{{le="{le}"}}'
        slow += sign * (buckets[key] - c.warm_buckets[key])
    return round(slow)


class SlowWatch:
    """Counts the ingests' answers over ``FAULT_BOUND_S`` every ``EVERY_S`` while the
    load runs, so a slow answer can be placed in time: inside the fault's window it is
    the fault's cost; elsewhere it is this machine's (two cores shared by ten
    processes, and in CI by whatever else runs)."""

    EVERY_S = 0.25

    def __init__(self, c: Cluster) -> None:
        self._c = c
        self.marks: list[tuple[float, int]] = [(time.monotonic(), 0)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.EVERY_S):
            self.marks.append((time.monotonic(), self._count()))

    def _count(self) -> int:
        return slow_count(self._c, ingest_buckets(self._c), FAULT_BOUND_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.marks.append((time.monotonic(), self._count()))

    def slow_within(self, start: float, end: float) -> int:
        """Slow answers counted in the scrapes that overlap [start, end]: each interval
        between two scrapes that touches the window counts whole, so nothing the
        window holds is missed."""
        return sum(
            now - before
            for (t0, before), (t1, now) in zip(self.marks, self.marks[1:], strict=False)
            if t1 >= start and t0 <= end
        )

    def timeline(self, origin: float) -> str:
        """Where the slow answers fell, in seconds from ``origin``: "+0.2s:3 +6.5s:1"."""
        return " ".join(
            f"{t1 - origin:+.1f}s:{now - before}"
            for (_, before), (t1, now) in zip(self.marks, self.marks[1:], strict=False)
            if now > before
        )


def until(started: float, at: float) -> None:
    """Sleep until ``at`` seconds after ``started`` (time.monotonic())."""
    time.sleep(max(0.0, started + at - time.monotonic()))


def check(
    c: Cluster, name: str, result: LoadResult, campaign: str, fault_at: float = 0.0,
    fast_through_fault: bool = False,
) -> list[str]:  # fmt: skip
    """What an operator would find wrong after the run; printed with the figures, and
    with when the ingests' answers over ``FAULT_BOUND_S`` were given (seconds from
    ``fault_at``).

    ``fast_through_fault``: not one answer over ``FAULT_BOUND_S``, as ingest measured
    it, from just before the fault to ``FAULT_WINDOW_S`` after it. A lost server must
    cost no more: its puts fail at once and go elsewhere. A hung one may cost up to the
    stall bound, by design: the requests inside the put in flight on it wait it out
    before another server takes them; ``ANY_BOUND_S`` bounds them."""
    assert c.watch is not None, "check() needs the load started by Cluster.load()"
    c.watch.stop()
    audit = audit_until_settled(c.database_url, campaign, result.acked, timeout=45)
    problems = []
    if result.failed:
        problems.append(f"{result.failed} requests failed")
    if audit.lost or audit.duplicated or audit.dead_letters:
        problems.append(f"not stored exactly once: {audit}")
    spooled, (server_p99, over_goal, over_any) = {}, ingest_side(c)
    if over_any:
        problems.append(f"{over_any} ingest answers took over {ANY_BOUND_S:g} s")
    in_window = c.watch.slow_within(fault_at - SlowWatch.EVERY_S, fault_at + FAULT_WINDOW_S)
    if fast_through_fault and in_window:
        problems.append(f"{in_window} ingest answers took over {FAULT_BOUND_S:g} s around "
                        "the fault")  # fmt: skip
    for proc, s in c.ingests:
        spooled[proc.name] = metric(s, names.INGEST_EVENTS + "_total", 'outcome="spooled"')
        if spooled[proc.name]:
            problems.append(f"{proc.name} spooled {spooled[proc.name]:.0f} events")
    for proc in [p for p, _ in c.ingests] + c.consumers:
        if proc.alive and proc.terminate() != 0:
            problems.append(f"{proc.name} exited with {proc.proc.returncode}")
    timeline = c.watch.timeline(fault_at) if fault_at else ""
    print(f"\n[{name}] sent={result.sent} acked={len(result.acked)} failed={result.failed} "
          f"p99={result.p99() * 1000:.1f}ms max={max(result.latencies, default=0) * 1000:.1f}ms "
          f"(goal {GOAL_S * 1000:.0f}ms; ingest-side p99 {server_p99 * 1000:.1f}ms, "
          f"{over_goal} over the goal, {over_any} over {ANY_BOUND_S:g}s"
          f"{', over ' + format(FAULT_BOUND_S, 'g') + 's at ' + timeline if timeline else ''}) "
          f"spooled={spooled} {audit}")  # fmt: skip
    return problems


def reachable(q: QueueServer) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((q.host.address, q.port)) == 0


def puts(queues: list[QueueServer]) -> int:
    return sum(q.stats()["cmd-put"] for q in queues)


def test_smoke_one_host_of_each(cluster: Callable[..., Cluster], keyring: Keyring) -> None:
    """One beanstalkd, one ingest, one consumer, the database: no fault, the baseline
    every scenario below is measured against."""
    c = cluster(queues=1, ingests=1, consumers=1)
    result = c.load(keyring, "nssmoke", seconds=4).wait()
    problems = check(c, "smoke", result, "nssmoke")
    assert len(result.acked) == result.sent == 4 * RATE
    assert not problems, "; ".join(problems)


def test_kill_one_beanstalkd(cluster: Callable[..., Cluster], keyring: Keyring) -> None:
    """kill -9 of one server under load: the other two take every put; once it is back
    on its binlog, what it had acknowledged is stored too."""
    c = cluster()
    load = c.load(keyring, "nskill")
    started = time.monotonic()
    until(started, 3)
    killed_at = time.monotonic()
    c.queues[0].kill()
    survivors_before = puts(c.queues[1:])
    result = load.wait()
    survivors_took = puts(c.queues[1:]) - survivors_before
    c.queues[0].start()
    problems = check(c, "kill -9 one beanstalkd", result, "nskill", killed_at,
                     fast_through_fault=True)  # fmt: skip
    if survivors_took == 0:
        problems.append("the other servers took no put after the kill")
    assert not problems, "; ".join(problems)


def test_hung_beanstalkd_past_the_stall_bound(
    cluster: Callable[..., Cluster], keyring: Keyring
) -> None:
    """SIGSTOP of one server (connections open, nothing answers) for six times the
    ingest's stall bound, then SIGCONT."""
    c = cluster()
    load = c.load(keyring, "nshung")
    started = time.monotonic()
    until(started, 3)
    fault_at = time.monotonic()
    c.queues[0].running.pause()
    time.sleep(6 * PUT_STALL_S)
    c.queues[0].running.resume()
    result = load.wait()
    name = f"SIGSTOP one beanstalkd {6 * PUT_STALL_S:.1f}s"
    problems = check(c, name, result, "nshung", fault_at)
    assert not problems, "; ".join(problems)


def test_partitioned_queue_host(cluster: Callable[..., Cluster], keyring: Keyring) -> None:
    """One queue host's link goes down for 3 s (no RST: connections hang), then back."""
    c = cluster()
    load = c.load(keyring, "nspart")
    started = time.monotonic()
    until(started, 3)
    fault_at = time.monotonic()
    c.queues[0].host.partition()
    assert not reachable(c.queues[0]), "the partitioned host still answers"
    until(started, 6)
    c.queues[0].host.heal()
    result = load.wait()
    problems = check(c, "partition one queue host 3s", result, "nspart", fault_at)
    assert not problems, "; ".join(problems)


def test_killed_beanstalkd_restarted_on_its_binlog_rejoins(
    cluster: Callable[..., Cluster], keyring: Keyring
) -> None:
    """kill -9 of one server, restarted 3 s later on its binlog while the load goes on:
    the jobs it held are consumed, and it takes puts again."""
    c = cluster()
    load = c.load(keyring, "nsrestart")
    started = time.monotonic()
    until(started, 3)
    fault_at = time.monotonic()
    c.queues[0].kill()
    until(started, 6)
    c.queues[0].start()
    result = load.wait()
    rejoined = c.queues[0].stats()["cmd-put"]  # counted since the restart
    problems = check(c, "restart a killed beanstalkd", result, "nsrestart", fault_at)
    if rejoined == 0:
        problems.append("the restarted server took no put")
    assert not problems, "; ".join(problems)


def test_kill_one_of_two_consumers(cluster: Callable[..., Cluster], keyring: Keyring) -> None:
    """kill -9 of one of two consumer processes mid-load: the jobs it held reserved go
    back to their servers and the other consumer stores them."""
    c = cluster(consumers=2)
    load = c.load(keyring, "nsconsumer")
    started = time.monotonic()
    until(started, 4)
    fault_at = time.monotonic()
    c.consumers[0].kill()
    result = load.wait()
    problems = check(c, "kill -9 one of two consumers", result, "nsconsumer", fault_at)
    assert not problems, "; ".join(problems)


def test_latency_helpers_use_netem_or_say_why_not(hosts: dict[str, Host]) -> None:
    """Added latency needs the kernel's netem qdisc: with it, a connection to a host
    takes the added delay; without it, asking for delay says why it cannot."""
    host = hosts["q3"]

    def connect_s() -> float:
        t0 = time.monotonic()
        with socket.socket() as sock:
            sock.settimeout(2)
            sock.connect_ex((host.address, 1))  # refused: one round trip
        return time.monotonic() - t0

    reason = host.net.netem_missing()
    if reason:
        with pytest.raises(NetemUnavailable, match="netem"):
            host.delay(40)
        print(f"\n[netem] {reason}")
        return
    try:
        host.delay(40)
        assert connect_s() >= 0.04
    finally:
        host.clear_delay()
    assert connect_s() < 0.04


def test_leftovers_of_a_dead_run_are_removed_and_a_live_runs_kept(
    network: Network, db: HostPostgres
) -> None:
    """A run killed before its finalizers leaves namespaces (with processes in them), a
    bridge and veths; the next run removes those of runs whose process is gone, and
    never what a run still alive (this one) owns."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    tag = f"{netns.PREFIX}{gone.pid}"
    subprocess.run(["ip", "netns", "add", f"{tag}-x"], check=True)
    subprocess.run(["ip", "link", "add", f"{tag}b", "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "add", f"{tag}v1", "type", "veth", "peer", "name", f"{tag}p1"],
                   check=True)  # fmt: skip
    datadir = Path(tempfile.gettempdir()) / f"{tag}-pg-x"
    datadir.mkdir()
    sleeper = subprocess.Popen(["ip", "netns", "exec", f"{tag}-x", "sleep", "60"])
    time.sleep(0.2)
    removed = netns.remove_leftovers()
    assert sleeper.wait(5) == -9  # killed with its namespace
    assert f"{tag}-x" in removed and f"{tag}b" in removed
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in links and tag not in spaces and not datadir.exists()
    mine = f"{netns.PREFIX}{os.getpid()}"
    assert network.bridge.startswith(mine) and network.bridge in links
    assert db.datadir.name.startswith(mine) and db.datadir.exists()
