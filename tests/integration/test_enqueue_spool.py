"""The enqueue task and its spool in this process, against a real beanstalkd.

No acknowledged event may be unreadable in the spool, and the loss counter counts
only what was really lost: a spool write that outlasts its timeout may still land.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest import spool_writer
from ingest.enqueue import Enqueuer, Outcome
from ingest.metrics import IngestMetrics
from ingest.spool import MAX_RECORD, Spool
from tests.servers import Beanstalkd, free_port, take_recipients
from trackbuf import codec
from trackbuf.events import new_event

pytestmark = pytest.mark.integration

TUBE = "trackbuf-events"


def events_total(registry: CollectorRegistry, kind: str, outcome: str) -> float:
    labels = {"kind": kind, "outcome": outcome}
    return registry.get_sample_value("trackbuf_ingest_events_total", labels) or 0.0


def test_a_backlog_spooled_under_the_largest_job_limit_is_replayed_whole(
    tmp_path: Path,
) -> None:
    """1,500 clicks of ~1.2 kB each arrive as one batch while beanstalkd is down, with a
    job limit asked above what the spool can read back. Every one is spooled, then
    replayed into beanstalkd (default -z: split again) when it comes back."""
    server = Beanstalkd(tmp_path / "binlog")  # not started: down
    registry = CollectorRegistry()
    url = "https://shop.example/" + "x" * 1100
    events = [new_event("click", "big", f"r{i:04d}", url=url) for i in range(1500)]
    assert sum(len(codec.encode_event(e)) for e in events[:1000]) > MAX_RECORD

    async def scenario() -> list[Outcome]:
        spool = Spool(tmp_path / "spool", max_bytes=1 << 30)
        enq = Enqueuer([("127.0.0.1", server.port)], TUBE, ttr=60, max_job_bytes=4 << 20,
                       metrics=IngestMetrics.create(registry), spool=spool)  # fmt: skip
        await enq.start()
        futures = [enq.submit(codec.encode_event(event)) for event in events]
        outcomes = [await future for future in futures]
        assert spool.pending_records >= 2
        server.start()
        deadline = time.monotonic() + 30
        while not spool.empty:
            assert time.monotonic() < deadline, "the spool was never replayed"
            await asyncio.sleep(0.05)
        assert await enq.close(5)
        return outcomes

    try:
        outcomes = asyncio.run(scenario())
        stored = take_recipients(server)
    finally:
        server.kill()
    assert outcomes == [Outcome.SPOOLED] * 1500
    assert stored == sorted(e.recipient for e in events)
    assert events_total(registry, "click", "lost") == 0


class HungDiskSpool(Spool):
    """A spool whose appends wait until the test lets them go, like a hung disk; then
    they really write (or, with ``full``, find no room)."""

    def __init__(self, directory: Path, full: bool = False) -> None:
        super().__init__(directory, max_bytes=1 << 20)
        self.release = threading.Event()
        self.full = full

    def append(self, body: bytes) -> bool:
        self.release.wait(10)
        return False if self.full else super().append(body)


@pytest.mark.parametrize("full", [False, True], ids=["write lands", "spool full"])
def test_a_spool_write_that_outlasts_its_timeout_is_counted_when_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, full: bool
) -> None:
    """beanstalkd down, the disk hung past the spool timeout: requests are answered
    (unconfirmed) instead of waiting, and nothing is counted lost yet. When the write
    ends, its events are counted for what became of them: spooled (and replayed
    later) if it landed, lost if it did not."""
    monkeypatch.setattr(spool_writer, "SPOOL_TIMEOUT_S", 0.2)
    registry = CollectorRegistry()
    spool = HungDiskSpool(tmp_path / "spool", full=full)

    async def scenario() -> tuple[list[Outcome], float, float, float, float, int]:
        enq = Enqueuer([("127.0.0.1", free_port())], TUBE, ttr=60, max_job_bytes=60000,
                       metrics=IngestMetrics.create(registry), spool=spool)  # fmt: skip
        await enq.start()
        started = time.monotonic()
        futures = [enq.submit(codec.encode_event(new_event("open", "hung", f"r{i}")))
                   for i in range(3)]  # fmt: skip
        outcomes = [await future for future in futures]
        waited = time.monotonic() - started
        lost_meanwhile = events_total(registry, "open", "lost")
        spool.release.set()
        deadline = time.monotonic() + 5
        while (
            events_total(registry, "open", "lost") + events_total(registry, "open", "spooled") < 3
        ):
            assert time.monotonic() < deadline, "the late write was never counted"
            await asyncio.sleep(0.02)
        records = spool.pending_records
        assert await enq.close(5)
        spooled = events_total(registry, "open", "spooled")
        return outcomes, waited, lost_meanwhile, events_total(registry, "open", "lost"), \
            spooled, records  # fmt: skip

    outcomes, waited, lost_meanwhile, lost, spooled, records = asyncio.run(scenario())
    assert outcomes == [Outcome.UNCONFIRMED] * 3
    assert waited < 2, "requests waited on the hung disk"
    assert lost_meanwhile == 0
    if full:
        assert (lost, spooled, records) == (3, 0, 0)
    else:
        assert (lost, spooled, records) == (0, 3, 1)


def test_a_lone_server_that_refuses_puts_is_asked_again_by_the_next_batch(
    beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    """One server in drain mode (SIGUSR1: every put answers DRAINING). With no other
    server to hand the events to, each refused batch goes to the spool at once, with no
    re-put and no rest: the next batch asks the server again."""
    assert beanstalkd.proc is not None
    beanstalkd.proc.send_signal(signal.SIGUSR1)
    registry = CollectorRegistry()
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)

    async def scenario() -> list[Outcome]:
        enq = Enqueuer([("127.0.0.1", beanstalkd.port)], TUBE, ttr=60, max_job_bytes=60000,
                       metrics=IngestMetrics.create(registry), spool=spool)  # fmt: skip
        await enq.start()
        outcomes = []
        for i in range(3):
            encoded = codec.encode_event(new_event("open", "drain", f"r{i}"))
            outcomes.append(await enq.submit(encoded))
        await enq.close(0.5)  # the spool stays: the server refuses its replay too
        return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes == [Outcome.SPOOLED] * 3
    # Three live puts at least (replay rounds may add more), each refused.
    assert beanstalkd.stats()["cmd-put"] >= 3
    reputs = registry.get_sample_value("trackbuf_ingest_jobs_reput_total", {"reason": "refused"})
    assert not reputs


def test_a_bug_in_a_spool_round_answers_its_requests_and_the_spooler_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The only server is down, so the spool answers. One spool round fails on a bug:
    its requests are answered (as lost, which the request's handler counts), not left
    waiting forever, and later events are spooled again: the spooler outlived the bug."""
    registry = CollectorRegistry()
    events = [new_event("open", "bug", f"r{i}") for i in range(6)]
    failures = iter([RuntimeError("a bug in a spool round")])

    async def scenario() -> tuple[list[Outcome], list[Outcome], bool]:
        spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
        enq = Enqueuer([("127.0.0.1", free_port())], TUBE, ttr=60, max_job_bytes=1 << 16,
                       metrics=IngestMetrics.create(registry), spool=spool)  # fmt: skip
        why = enq._why_spool

        def why_spool_once_broken() -> str:
            error = next(failures, None)
            if error is not None:
                raise error
            return why()

        monkeypatch.setattr(enq, "_why_spool", why_spool_once_broken)
        await enq.start()
        first = [enq.submit(codec.encode_event(e)) for e in events[:3]]
        first_outcomes = await asyncio.wait_for(asyncio.gather(*first), 10)
        later = [enq.submit(codec.encode_event(e)) for e in events[3:]]
        later_outcomes = await asyncio.wait_for(asyncio.gather(*later), 10)
        ready = enq.ready()
        await enq.close(1)
        return list(first_outcomes), list(later_outcomes), ready

    first, later, ready = asyncio.run(scenario())
    assert first == [Outcome.LOST] * 3
    assert later == [Outcome.SPOOLED] * 3
    assert ready
