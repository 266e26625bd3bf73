"""The backlog outlives beanstalkd's memory: above its high-water mark (or once it
answers OUT_OF_MEMORY) a server gets no more events, they go to the spool in order,
and the spool is replayed, oldest first, once the server has drained below low water.

Real beanstalkd servers; nothing consumes while events arrive (the database is down),
then the test drains the queue as the consumer would.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest.enqueue import Enqueuer
from ingest.metrics import IngestMetrics
from ingest.outcomes import Outcome
from ingest.spool import Spool
from tests.servers import Beanstalkd, take_in_order
from trackbuf import codec
from trackbuf.events import new_event

pytestmark = pytest.mark.integration

TUBE = "trackbuf-events"
HIGH_WATER = 200_000


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def push(enq: Enqueuer, recipients: list[str]) -> list[Outcome]:
    """Send in bursts of 50 concurrent requests, each burst answered before the next."""
    outcomes: list[Outcome] = []
    for start in range(0, len(recipients), 50):
        burst = recipients[start : start + 50]
        futures = [enq.submit(codec.encode_event(new_event("open", "hw", r))) for r in burst]
        outcomes += [await future for future in futures]
    return outcomes


async def drain(enq: Enqueuer, servers: list[Beanstalkd]) -> list[list[str]]:
    """Empty the servers as a consumer would, until the spool is empty and nothing is
    left: what each server gave, in the order it gave it."""
    spool = enq.spool
    assert spool is not None
    taken: list[list[str]] = [[] for _ in servers]
    deadline = time.monotonic() + 60
    while True:
        for i, server in enumerate(servers):
            taken[i] += await asyncio.to_thread(take_in_order, server)
        if spool.empty:
            for i, server in enumerate(servers):
                taken[i] += await asyncio.to_thread(take_in_order, server)
            return taken
        assert time.monotonic() < deadline, "the spool was never replayed"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("servers", [1, 2])
def test_above_high_water_events_go_to_disk_and_come_back_oldest_first(
    tmp_path: Path, servers: int
) -> None:
    pool = [Beanstalkd(tmp_path / f"binlog{i}").start() for i in range(servers)]
    registry = CollectorRegistry()
    # About four times what the pool takes below its marks.
    recipients = [f"r{i:05d}" for i in range(4000 * servers)]

    async def scenario() -> tuple[list[Outcome], list[list[str]], int]:
        addresses = [("127.0.0.1", s.port) for s in pool]
        metrics = IngestMetrics.create(registry)
        spool = Spool(tmp_path / "spool", max_bytes=1 << 30)
        enq = Enqueuer(addresses, TUBE, ttr=60, max_job_bytes=1 << 16, metrics=metrics,
                       spool=spool, queue_max_bytes=HIGH_WATER)  # fmt: skip
        await enq.start()
        outcomes = await push(enq, recipients)
        for server in pool:
            assert sample(registry, "trackbuf_ingest_queue_full", server=server.address) == 1
        spooled_events = spool.pending_events
        assert sample(registry, "trackbuf_ingest_spool_events") == spooled_events
        taken = await drain(enq, pool)
        assert await enq.close(5)
        return outcomes, taken, spooled_events

    try:
        outcomes, taken, spooled_events = asyncio.run(scenario())
        held = [s.tube_stats()["current-jobs-ready"] for s in pool]
    finally:
        for server in pool:
            server.kill()
    assert Outcome.LOST not in outcomes and Outcome.UNCONFIRMED not in outcomes
    spooled = [r for r, o in zip(recipients, outcomes, strict=True) if o is Outcome.SPOOLED]
    assert len(spooled) == spooled_events > len(recipients) // 2  # the rest went to disk
    # Every acknowledged event exactly once.
    assert sorted(r for part in taken for r in part) == recipients
    assert held == [0] * servers
    # Oldest first: with nothing arriving during the drain, each server gives its events
    # in the order they were sent (what it held first, then the spool in order).
    for part in taken:
        assert part == sorted(part)
    assert sample(registry, "trackbuf_ingest_events_total", kind="open", outcome="lost") == 0


def test_out_of_memory_spills_to_disk_and_nothing_is_lost(tmp_path: Path) -> None:
    """A beanstalkd whose memory runs out before the mark (an address-space limit far
    below TRACKBUF_QUEUE_MAX_BYTES) answers OUT_OF_MEMORY: those events are spooled,
    and replayed once it has room again."""
    server = Beanstalkd(tmp_path / "binlog").start()
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/status") as status:
        vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize"))
    limit = vm_kb * 1024 + (3 << 20)
    subprocess.run(["prlimit", "--pid", str(server.proc.pid), f"--as={limit}"], check=True)
    registry = CollectorRegistry()
    recipients = [f"r{i:06d}" for i in range(60_000)]  # ~ 7 MB of jobs, twice the limit

    async def scenario() -> tuple[list[Outcome], list[list[str]]]:
        spool = Spool(tmp_path / "spool", max_bytes=1 << 30)
        enq = Enqueuer([("127.0.0.1", server.port)], TUBE, ttr=60, max_job_bytes=1 << 16,
                       metrics=IngestMetrics.create(registry), spool=spool)  # fmt: skip
        await enq.start()
        outcomes = await push(enq, recipients)
        taken = await drain(enq, [server])
        assert await enq.close(5)
        return outcomes, taken

    try:
        outcomes, taken = asyncio.run(scenario())
        assert server.proc.poll() is None, "beanstalkd died"
    finally:
        server.kill()
    assert Outcome.LOST not in outcomes
    assert Outcome.SPOOLED in outcomes, "beanstalkd never ran out of memory"
    assert sorted(taken[0]) == recipients
    assert sample(registry, "trackbuf_ingest_events_total", kind="open", outcome="lost") == 0
