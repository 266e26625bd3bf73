"""beanstalkd under a memory limit, as under a container's: an outage longer than its
memory allows spills to ingest's disk instead of getting beanstalkd killed.

beanstalkd runs in a memory cgroup of its own (a child of this process's cgroup, v1
``memory.limit_in_bytes``), so the kernel's OOM killer acts on it as it would in a
container. The figures are printed with ``pytest -s`` (docs/RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import TEMPLATE
from tests.faults.test_outages import metric, report, start_consumer
from tests.load import Load, Sent, audit_until_settled
from tests.procs import start_ingest
from tests.servers import Beanstalkd, Postgres, wait_port
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.faults

LIMIT = 16 << 20  # beanstalkd's memory, as in a small container
HIGH_WATER = 5 << 20  # a third of it: room for the binlog's page cache and the estimate
URL_PAD = "q" * 1800  # events of about 2 kB: several times the limit in a short run


class MemoryCgroup:
    """A v1 memory cgroup under this process's own, with a limit."""

    def __init__(self, limit: int) -> None:
        self.path = _own_memory_cgroup() / f"trackbuf-test-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def max_usage(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def remove(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _own_memory_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    raise FileNotFoundError("no v1 memory cgroup")


@pytest.fixture
def cgroup() -> Iterator[MemoryCgroup]:
    """Skipped, with the reason, where a memory cgroup cannot be made (no cgroup v1
    memory controller, not root): a condition of the machine, not of the code."""
    try:
        group = MemoryCgroup(LIMIT)
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup: {exc!r}")
    try:
        yield group
    finally:
        group.remove()


class LimitedBeanstalkd(Beanstalkd):
    """A beanstalkd that starts inside the cgroup, binlog replay included."""

    def __init__(self, binlog_dir: Path, group: MemoryCgroup | None) -> None:
        super().__init__(binlog_dir)
        self.group = group

    def start(self) -> LimitedBeanstalkd:
        cmd = [self.binary, "-l", "127.0.0.1", "-p", str(self.port), "-b", str(self.binlog_dir)]
        if self.group is not None:
            enter = f'echo $$ > {self.group.path / "cgroup.procs"} && exec "$0" "$@"'
            cmd = ["sh", "-c", enter, *cmd]
        # Its stderr would be one line per refused allocation.
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self


def big_click(campaign: str, i: int) -> Sent:
    return Sent("click", campaign, f"{campaign}-r{i}", f"https://shop.example/{i}?{URL_PAD}")


def storage_order(dsn: str, campaign: str) -> list[int]:
    """The request number of each stored event, in the order they were stored (one
    transaction's events by request number: they were stored at the same moment)."""

    async def fetch() -> list[int]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT stored_at, recipient FROM events WHERE campaign = $1", campaign
            )
        finally:
            await conn.close()
        keyed = sorted((row["stored_at"], int(row["recipient"].rsplit("-r", 1)[1])) for row in rows)
        return [number for _, number in keyed]

    return asyncio.run(fetch())


def inversions(order: list[int]) -> int:
    """Pairs stored in the opposite order to the one they were sent in (merge sort)."""

    def count(items: list[int]) -> tuple[list[int], int]:
        if len(items) < 2:
            return items, 0
        left, a = count(items[: len(items) // 2])
        right, b = count(items[len(items) // 2 :])
        merged: list[int] = []
        crossed = i = j = 0
        while i < len(left) and j < len(right):
            if left[i] <= right[j]:
                merged.append(left[i])
                i += 1
            else:
                merged.append(right[j])
                crossed += len(left) - i
                j += 1
        return merged + left[i:] + right[j:], a + b + crossed

    return count(order)[1]


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def test_an_outage_beyond_beanstalkds_memory_spills_to_disk_and_loses_nothing(
    make_settings: Callable[..., Settings], own_postgres: Postgres, cgroup: MemoryCgroup,
    keyring: Keyring, tmp_path: Path,
) -> None:  # fmt: skip
    server = LimitedBeanstalkd(tmp_path / "limited-binlog", cgroup).start()
    settings = make_settings(
        beanstalkd=server.address, database_url=own_postgres.dsn(TEMPLATE), threads=2,
        queue_max_bytes=HIGH_WATER,
    )  # fmt: skip
    own_postgres.stop("fast")
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    consumer = start_consumer(settings, tmp_path / "consumer.log")
    count = 24_000  # about 48 MB of events: three times the limit
    try:
        load = Load(f"http://{settings.listen}", keyring, "memlimit", count=count, rate=1500,
                    concurrency=32, plan=big_click)  # fmt: skip
        started = time.monotonic()
        result = load.start().wait(timeout=300)
        pushed_s = time.monotonic() - started
        assert server.proc is not None and server.proc.poll() is None, "beanstalkd died"
        spooled_events = metric(settings, "trackbuf_ingest_spool_events")
        held = server.tube_stats()["current-jobs-ready"]
        full = metric(settings, "trackbuf_ingest_queue_full")
        usage_during = cgroup.max_usage()
        own_postgres.start()
        returned = time.monotonic()
        audit = audit_until_settled(settings.database_url, "memlimit", result.acked, timeout=240)
        drained_s = time.monotonic() - returned
        order = storage_order(settings.database_url, "memlimit")
        wait_for(lambda: metric(settings, "trackbuf_ingest_spool_events") == 0, "spool empty")
    finally:
        alive = server.proc is not None and server.proc.poll() is None
        server.kill()
    pairs = len(order) * (len(order) - 1) // 2
    inverted = inversions(order) / max(pairs, 1)
    report(
        "beanstalkd under a 16 MB memory limit, database down",
        f"sent={result.sent} failed={result.failed} pushed_in={pushed_s:.1f}s "
        f"p99={result.p99() * 1000:.1f}ms spooled_events_at_end={spooled_events:.0f} "
        f"jobs_in_beanstalkd={held} cgroup_max_usage={usage_during / 2**20:.1f}MB "
        f"oom_kills={cgroup.oom_kills()} drained_in={drained_s:.1f}s "
        f"inverted_pairs={inverted:.4f}",
        audit,
    )
    assert alive, "beanstalkd was killed"
    assert cgroup.oom_kills() == 0
    assert full == 1 and spooled_events > count // 2, "the outage never outgrew the mark"
    assert result.failed == 0 and audit.acked == count
    assert audit.lost == 0 and audit.duplicated == 0 and audit.dead_letters == 0
    # Oldest first within reason: beanstalkd hands out its jobs oldest first and the
    # spool is replayed in the order it was written, behind what beanstalkd still held;
    # only concurrent requests and the consumer's parallel batches swap neighbours.
    # (All newest first would invert every pair; a random order, half of them.)
    assert inverted < 0.05
    assert consumer.terminate() == 0 and ingest.terminate() == 0


def test_a_binlog_larger_than_the_memory_limit_cannot_be_replayed_under_it(
    cgroup: MemoryCgroup, tmp_path: Path
) -> None:
    """What the high-water mark prevents: a beanstalkd killed with more jobs in its
    binlog than its memory limit holds is killed again by the OOM killer while it
    replays the binlog, on every restart under that limit. Nothing is lost (the binlog
    is left as it was) and a restart with more memory brings every job back."""
    binlog = tmp_path / "binlog"
    free = LimitedBeanstalkd(binlog, None).start()
    jobs, body = 12_000, b"x" * 2000  # 24 MB of bodies: more than the 16 MB limit
    with free.client() as client:
        for _ in range(jobs):
            client.put(body)
    free.kill()
    sizes = {path.name: path.stat().st_size for path in binlog.iterdir()}
    limited = LimitedBeanstalkd(binlog, cgroup)
    limited.port = free.port
    with contextlib.suppress(RuntimeError):  # killed before it listens: start() says so
        limited.start()
    assert limited.proc is not None
    assert limited.proc.wait(30) == -signal.SIGKILL  # the OOM killer, during the replay
    assert cgroup.oom_kills() >= 1
    assert {path.name: path.stat().st_size for path in binlog.iterdir()} == sizes
    restored = LimitedBeanstalkd(binlog, None)
    restored.port = free.port
    restored.start()
    try:
        assert restored.tube_stats()["current-jobs-ready"] == jobs
    finally:
        restored.kill()
    report("binlog larger than the memory limit", f"jobs={jobs}", f"oom_kills={cgroup.oom_kills()}")
