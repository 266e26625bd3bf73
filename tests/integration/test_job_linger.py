"""Holding a job open for more events (TRACKBUF_JOB_LINGER_MS), against a real beanstalkd.

What a user of the setting expects: events that arrive within the linger share one job
(one put, one reserve and delete in the consumer); the first event waits the linger for
its answer, not the whole trickle; a job that is full enough goes at once; 0 puts every
job at once. Jobs are read back with greenstalk, not trackbuf's own client.

Timing is arranged, not assumed: the linger is long next to the trickle (so a slow
machine still fits it in), and where two events must land in separate jobs the second
is sent only after the first was acknowledged. Upper bounds on waits are loose enough
for a machine twice as slow; a put into a fresh binlog took 34 ms on a busy one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest.enqueue import Enqueuer, Outcome
from ingest.linger import ENOUGH_EVENTS
from ingest.metrics import IngestMetrics
from tests.servers import Beanstalkd, taken_jobs
from trackbuf import codec
from trackbuf.events import new_event

pytestmark = pytest.mark.integration

TUBE = "trackbuf-events"
LINGER_S = 1.0  # long next to a trickle of 5 events 2 ms apart, even on a slow machine


def jobs(servers: list[Beanstalkd]) -> list[list[str]]:
    """The recipients of each job queued on ``servers``, each job once; the jobs are
    deleted. In a pool, a put that outlasts the stall bound (0.1 s: a first put into a
    fresh binlog on a busy machine can) is handed to another server as well, by design
    (at-least-once; the consumer's insert absorbs the copy), so a job may be found
    twice: the same events, in two places."""
    found = [sorted(e.recipient for e in job) for s in servers for job in taken_jobs(s, TUBE)]
    return [list(job) for job in sorted({tuple(job) for job in found})]


def enqueuer(servers: list[Beanstalkd], linger_s: float) -> Enqueuer:
    metrics = IngestMetrics.create(CollectorRegistry())
    addresses = [("127.0.0.1", s.port) for s in servers]
    return Enqueuer(addresses, TUBE, ttr=60, max_job_bytes=60000, metrics=metrics,
                    linger_s=linger_s)  # fmt: skip


def trickle(
    servers: list[Beanstalkd], linger_s: float, count: int, gap_s: float, one_by_one: bool = False
) -> list[float]:
    """``count`` events, one every ``gap_s``; how long each waited for its answer.
    ``one_by_one``: each event is sent only once the one before it was answered."""

    async def scenario() -> list[float]:
        enq = enqueuer(servers, linger_s)
        await enq.start()

        async def one(i: int) -> float:
            started = time.perf_counter()
            encoded = codec.encode_event(new_event("open", "linger", f"r{i:03d}"))
            assert await enq.submit(encoded) is Outcome.QUEUED
            return time.perf_counter() - started

        waits = []
        for i in range(count):
            waits.append(asyncio.ensure_future(one(i)))
            if one_by_one:
                await waits[-1]
            await asyncio.sleep(gap_s)
        done = await asyncio.gather(*waits)
        assert await enq.close(5)
        return list(done)

    return asyncio.run(scenario())


@pytest.fixture(params=[1, 3], ids=["one server", "pool of three"])
def servers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[Beanstalkd]]:
    started = [Beanstalkd(tmp_path / f"binlog-{n}").start() for n in range(request.param)]
    yield started
    for server in started:
        server.kill()


def test_events_arriving_within_the_linger_share_a_job(servers: list[Beanstalkd]) -> None:
    waits = trickle(servers, LINGER_S, count=5, gap_s=0.002)
    assert jobs(servers) == [[f"r{i:03d}" for i in range(5)]]
    # The first event waited the linger (a timer never fires early), and not twice
    # it; the last one joined late and waited less.
    assert LINGER_S * 0.8 <= waits[0] < 2 * LINGER_S
    assert waits[-1] < waits[0]


def test_without_a_linger_each_job_is_put_at_once(servers: list[Beanstalkd]) -> None:
    """Each event sent after the previous one's answer: with no linger, none is held
    back for company, so each is a job of its own, answered in a fraction of the 1 s
    linger the test above waits (natural batching still joins events that arrive
    while a put is in flight; sending one by one leaves none to join)."""
    waits = trickle(servers, 0.0, count=5, gap_s=0.0, one_by_one=True)
    assert sorted(jobs(servers)) == [[f"r{i:03d}"] for i in range(5)]
    assert max(waits) < LINGER_S / 2


def test_a_job_with_enough_events_does_not_wait_out_the_linger(
    servers: list[Beanstalkd],
) -> None:
    waits = trickle(servers, 5.0, count=ENOUGH_EVENTS, gap_s=0.0)
    assert sorted(r for job in jobs(servers) for r in job) == [
        f"r{i:03d}" for i in range(ENOUGH_EVENTS)
    ]
    assert max(waits) < 1.0  # not the 5 s linger
