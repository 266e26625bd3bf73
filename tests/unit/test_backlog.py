"""The high-water hysteresis of one beanstalkd server, as ingest estimates its backlog."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ingest.backlog import JOB_OVERHEAD_BYTES, LOW_WATER, Backlog
from ingest.metrics import IngestMetrics

SERVER = ("127.0.0.1", 11300)


def backlog(high: int) -> tuple[Backlog, list[bool], CollectorRegistry]:
    registry = CollectorRegistry()
    seen: list[bool] = []
    b = Backlog(SERVER, "t", high, IngestMetrics.create(registry), on_change=lambda: None)
    b._on_change = lambda: seen.append(b.full)
    return b, seen, registry


def full_gauge(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("trackbuf_ingest_queue_full", {"server": "127.0.0.1:11300"})


def test_own_puts_reach_the_mark_before_the_next_poll() -> None:
    b, seen, registry = backlog(high=10 * (1000 + JOB_OVERHEAD_BYTES))
    for _ in range(9):
        b.put(1000)
    assert not b.full and full_gauge(registry) == 0
    b.put(1000)
    assert b.full and seen == [True] and full_gauge(registry) == 1


def test_full_until_the_server_drains_below_low_water() -> None:
    b, seen, _ = backlog(high=100_000)
    for _ in range(100):
        b.put(1000)
    assert b.full
    per_job = b.mean_job_bytes + JOB_OVERHEAD_BYTES
    # The poll saw the 100 jobs (asked after all the puts): still full.
    b.note_queue_stats(100, put_at_ask=b._put_bytes)
    assert b.full
    # Drained to between the marks: still full (no flapping at the mark).
    b.note_queue_stats(int(100_000 * 0.9 / per_job), put_at_ask=b._put_bytes)
    assert b.full
    b.note_queue_stats(int(100_000 * LOW_WATER / per_job) - 1, put_at_ask=b._put_bytes)
    assert not b.full and seen == [True, False]


def test_puts_after_the_stats_was_asked_still_count() -> None:
    b, _, _ = backlog(high=1 << 30)
    asked = b._put_bytes
    b.put(5000)  # in flight while stats was answered
    b.note_queue_stats(0, put_at_ask=asked)
    assert b.held_bytes == 5000 + JOB_OVERHEAD_BYTES


def test_out_of_memory_makes_the_server_full_at_what_it_holds() -> None:
    b, seen, _ = backlog(high=1 << 30)
    b.note_queue_stats(1000, put_at_ask=0)
    held = b.held_bytes
    b.out_of_memory()
    assert b.full and seen == [True]
    assert b.low_water == int(held * LOW_WATER)
    b.note_queue_stats(800, put_at_ask=0)  # 80% of what it held: not yet
    assert b.full
    b.note_queue_stats(700, put_at_ask=0)
    assert not b.full
    assert b.low_water == int((1 << 30) * LOW_WATER)  # the configured mark is back
