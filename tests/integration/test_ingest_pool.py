"""Ingest over a pool of beanstalkd servers, in this process, against real servers.

Jobs spread over every server, each acknowledged event is in exactly one of them, the
spool is used only when no server accepts, and readiness follows the pool.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest.enqueue import Enqueuer
from ingest.metrics import IngestMetrics
from ingest.outcomes import Outcome
from ingest.spool import Spool
from tests.servers import Beanstalkd, take_recipients
from trackbuf import codec
from trackbuf.events import new_event

pytestmark = pytest.mark.integration

TUBE = "trackbuf-events"


@pytest.fixture
def three(beanstalkd_pool: list[Beanstalkd]) -> list[Beanstalkd]:
    """The shared pool of three servers (tests/conftest.py), by a short name."""
    return beanstalkd_pool


def pool(servers: list[Beanstalkd], tmp_path: Path, registry: CollectorRegistry,
         spool_bytes: int = 1 << 24) -> Enqueuer:  # fmt: skip
    return Enqueuer(
        [("127.0.0.1", s.port) for s in servers], TUBE, ttr=60, max_job_bytes=1 << 16,
        metrics=IngestMetrics.create(registry),
        spool=Spool(tmp_path / "spool", max_bytes=spool_bytes) if spool_bytes else None,
    )  # fmt: skip


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def send(
    enq: Enqueuer, recipients: list[str], clients: int, latencies: list[float] | None = None
) -> list[Outcome]:
    """Send these events from ``clients`` concurrent requesters, each waiting for its
    answer before sending the next, as HTTP clients do."""
    outcomes: list[Outcome] = []
    queue = list(recipients)

    async def client() -> None:
        while queue:
            event = new_event("open", "pool", queue.pop())
            started = time.perf_counter()
            outcomes.append(await enq.submit(codec.encode_event(event)))
            if latencies is not None:
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes


def test_jobs_spread_over_every_server_and_each_event_is_in_exactly_one(
    three: list[Beanstalkd], tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    recipients = [f"r{i:05d}" for i in range(3000)]

    async def scenario() -> list[Outcome]:
        enq = pool(three, tmp_path, registry)
        await enq.start()
        assert sample(registry, "trackbuf_ingest_beanstalkd_servers_up") == 3
        for server in three:
            up = sample(registry, "trackbuf_ingest_beanstalkd_up", server=server.address)
            assert up == 1, server.address
        outcomes = await send(enq, recipients, clients=16)
        assert await enq.close(5)
        return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes == [Outcome.QUEUED] * len(recipients)
    per_server = [take_recipients(server) for server in three]
    assert all(len(found) > 100 for found in per_server), [len(f) for f in per_server]
    everything = sorted(r for found in per_server for r in found)
    assert everything == recipients  # each exactly once: no loss, no duplicate
    assert sample(registry, "trackbuf_ingest_events_total", kind="open", outcome="spooled") == 0


def test_all_servers_down_spools_and_the_first_back_takes_the_replay(
    tmp_path: Path,
) -> None:
    servers = [Beanstalkd(tmp_path / f"binlog{i}") for i in range(3)]  # not started: down
    registry = CollectorRegistry()
    recipients = [f"r{i:04d}" for i in range(200)]

    async def scenario() -> tuple[list[Outcome], list[Outcome]]:
        enq = pool(servers, tmp_path, registry)
        await enq.start()
        assert not enq.connected and enq.ready()  # the spool has room
        spooled = await send(enq, recipients, clients=8)
        assert enq.spool is not None and not enq.spool.empty
        servers[1].start()  # one comes back: the spool replays into it
        deadline = time.monotonic() + 15
        while not enq.spool.empty:
            assert time.monotonic() < deadline, "the spool was never replayed"
            await asyncio.sleep(0.05)
        live = await send(enq, ["late1", "late2"], clients=2)
        assert await enq.close(5)
        return spooled, live

    try:
        spooled, live = asyncio.run(scenario())
        stored = take_recipients(servers[1])
    finally:
        for server in servers:
            server.kill()
    assert spooled == [Outcome.SPOOLED] * len(recipients)
    assert live == [Outcome.QUEUED] * 2
    assert stored == sorted([*recipients, "late1", "late2"])
    assert sample(registry, "trackbuf_ingest_spool_replayed_jobs_total") > 0
    assert sample(registry, "trackbuf_ingest_beanstalkd_servers_up") == 1


@pytest.mark.parametrize("spool_bytes", [0, 1000], ids=["no spool", "spool full"])
def test_ready_while_one_server_of_three_is_up_not_when_none_and_no_spool_room(
    three: list[Beanstalkd], tmp_path: Path, spool_bytes: int
) -> None:
    """With no spool (or no room in it) to fall back on, readiness is the pool's."""
    registry = CollectorRegistry()

    async def scenario() -> list[bool]:
        enq = pool(three, tmp_path, registry, spool_bytes=spool_bytes)
        await enq.start()
        seen = [enq.ready()]
        three[0].kill()
        three[1].kill()
        await wait_for(lambda: sample(registry, "trackbuf_ingest_beanstalkd_servers_up") == 1)
        seen.append(enq.ready())
        assert await enq.submit(codec.encode_event(new_event("open", "c", "one"))) is (
            Outcome.QUEUED
        )
        three[2].kill()
        await wait_for(lambda: not enq.connected)
        seen.append(enq.ready())
        assert await enq.close(5)
        return seen

    assert asyncio.run(scenario()) == [True, True, False]
    for server in three:
        assert sample(registry, "trackbuf_ingest_beanstalkd_up", server=server.address) == 0


def test_a_draining_server_is_passed_over_without_the_spool(
    three: list[Beanstalkd], tmp_path: Path
) -> None:
    """A server that refuses puts (drain mode, SIGUSR1) rests out of rotation; the jobs
    it refused go to the other servers, not to the spool."""
    registry = CollectorRegistry()
    assert three[0].proc is not None
    three[0].proc.send_signal(signal.SIGUSR1)
    recipients = [f"r{i:04d}" for i in range(600)]

    async def scenario() -> list[Outcome]:
        enq = pool(three, tmp_path, registry)
        await enq.start()
        outcomes = await send(enq, recipients, clients=8)
        assert await enq.close(5)
        return outcomes

    assert asyncio.run(scenario()) == [Outcome.QUEUED] * len(recipients)
    assert take_recipients(three[0]) == []
    assert sorted(take_recipients(three[1]) + take_recipients(three[2])) == recipients
    assert sample(registry, "trackbuf_ingest_jobs_reput_total", reason="refused") >= 1
    # Resting with backoff: the draining server is not asked for every job.
    assert three[0].stats()["cmd-put"] < 10


def test_a_server_behind_a_slow_link_is_passed_over(
    three: list[Beanstalkd], tmp_path: Path
) -> None:
    """One server answers 60 ms late (a proxy delays its replies; still short of the
    stall bound): once its first put shows it, the others take the jobs, so nine
    answers in ten stay under its 60 ms (a third would not if it kept its turn)."""
    registry = CollectorRegistry()
    recipients = [f"r{i:05d}" for i in range(3000)]

    async def scenario() -> tuple[list[Outcome], list[float]]:
        proxy = await asyncio.start_server(
            lambda r, w: relay(r, w, three[0].port, delay=0.06), "127.0.0.1", 0
        )
        slow = ("127.0.0.1", proxy.sockets[0].getsockname()[1])
        async with proxy:
            enq = Enqueuer(
                [slow] + [("127.0.0.1", s.port) for s in three[1:]], TUBE, ttr=60,
                max_job_bytes=1 << 16, metrics=IngestMetrics.create(registry),
                spool=Spool(tmp_path / "spool", max_bytes=1 << 24),
            )  # fmt: skip
            await enq.start()
            latencies: list[float] = []
            outcomes = await send(enq, recipients, clients=8, latencies=latencies)
            assert await enq.close(5)
        return outcomes, latencies

    outcomes, latencies = asyncio.run(scenario())
    assert outcomes == [Outcome.QUEUED] * len(recipients)
    on_slow = take_recipients(three[0])
    assert len(on_slow) < 100, len(on_slow)  # its first few jobs, then passed over
    assert sorted(on_slow + take_recipients(three[1]) + take_recipients(three[2])) == recipients
    # Had the slow server kept its turn, every third job (a third of the answers)
    # would take its 60 ms; passed over, nine in ten are far faster even on a slow
    # machine. The p99 goal (50 ms) is the benchmarks' to measure.
    assert sorted(latencies)[int(len(latencies) * 0.9)] < 0.06


async def relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int, delay: float
) -> None:
    """Forward a connection to beanstalkd on ``port``, its replies ``delay`` late."""
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, late: float) -> None:
        while data := await src.read(65536):
            if late:
                loop.call_later(late, dst.write, data)
            else:
                dst.write(data)

    try:
        await asyncio.gather(pipe(reader, up_writer, 0), pipe(up_reader, writer, delay))
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        up_writer.close()
        writer.close()


async def wait_for(condition: object, timeout: float = 10) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        # Without traffic a dead server is noticed at the idle ping (once a second).
        await asyncio.sleep(0.05)
