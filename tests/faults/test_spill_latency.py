"""What a client sees through a spill to disk and its replay: steady traffic while the
database goes down, the backlog outgrows the high-water mark and spills to ingest's
spool, and the database returns and the spool is replayed under the same traffic. And
how long a drain from disk takes.

Asserts what a user checks (nothing lost, nothing twice, the spill and the replay
happened); the latency of each phase is printed for docs/RELIABILITY.md, never
asserted (pytest -s).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from ingest.spool import Spool
from tests.conftest import TEMPLATE
from tests.faults.test_outages import metric, report, start_consumer
from tests.load import Load, audit_until_settled
from tests.procs import start_ingest, trackbuf
from tests.servers import Beanstalkd, Postgres
from trackbuf import codec
from trackbuf.events import new_event
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.faults

RATE = 800  # requests/s, steady through every phase
HIGH_WATER = 1 << 20  # about 6,000 events of this load: a spill a few seconds in


def test_client_latency_through_a_spill_to_disk_and_its_replay(
    make_settings: Callable[..., Settings], own_postgres: Postgres, keyring: Keyring,
    tmp_path: Path,
) -> None:  # fmt: skip
    settings = make_settings(
        database_url=own_postgres.dsn(TEMPLATE), threads=2, queue_max_bytes=HIGH_WATER
    )
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    consumer = start_consumer(settings, tmp_path / "consumer.log")
    count = RATE * 30
    marks: dict[str, float] = {}
    watching = threading.Event()

    def watch() -> None:
        # When the spill starts and when the spool is empty again, from ingest's metrics.
        while not watching.is_set():
            full = metric(settings, "trackbuf_ingest_queue_full")
            on_disk = metric(settings, "trackbuf_ingest_spool_events")
            now = time.monotonic()
            if full and "spill" not in marks:
                marks["spill"] = now
            if "db_up" in marks and not on_disk and "replayed" not in marks:
                marks["replayed"] = now
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    load = Load(f"http://{settings.listen}", keyring, "spill", count=count, rate=RATE)
    marks["start"] = time.monotonic()
    load.start()
    watcher.start()
    try:
        time.sleep(4)
        own_postgres.stop("fast")
        marks["db_down"] = time.monotonic()
        time.sleep(14)
        own_postgres.start()
        marks["db_up"] = time.monotonic()
        result = load.wait(timeout=120)
        marks["end"] = time.monotonic()
        audit = audit_until_settled(settings.database_url, "spill", result.acked, timeout=120)
        deadline = time.monotonic() + 60
        while "replayed" not in marks and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        watching.set()
        watcher.join()
    spooled = metric(settings, 'trackbuf_ingest_events_total{kind="open",outcome="spooled"}')

    def p99(start: str, end: str) -> str:
        if start not in marks or end not in marks:
            return "n/a"
        return f"{result.p99_between(marks[start], marks[end]) * 1000:.1f}ms"

    report(
        "client latency through a spill and its replay",
        f"rate={RATE}/s sent={result.sent} failed={result.failed} spooled_opens={spooled:.0f} "
        f"p99 normal={p99('start', 'db_down')} backlog_in_memory={p99('db_down', 'spill')} "
        f"spilling={p99('spill', 'db_up')} replaying={p99('db_up', 'replayed')} "
        f"overall={result.p99() * 1000:.1f}ms "
        f"spill_after={marks.get('spill', 0) - marks['db_down']:.1f}s "
        f"replayed_after={marks.get('replayed', 0) - marks['db_up']:.1f}s",
        audit,
    )
    assert result.failed == 0 and audit.acked == count
    assert audit.lost == 0 and audit.duplicated == 0 and audit.dead_letters == 0
    assert "spill" in marks and spooled > 0, "the backlog never outgrew the mark"
    assert "replayed" in marks, "the spool was never replayed"
    assert consumer.terminate() == 0 and ingest.terminate() == 0


def test_a_spool_from_disk_drains_into_the_database(
    make_settings: Callable[..., Settings], beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    """How long a drain from disk takes: a spool of 150,000 events (records of 30, as
    under load) from a host that is gone, replayed with ``trackbuf spool replay`` while
    the consumer stores them. Every event is stored once; the time is printed."""
    settings = make_settings(threads=4)
    directory = tmp_path / "left-behind"
    spool = Spool(directory, max_bytes=1 << 34, fsync="never")
    spool.open()
    events = 0
    for record in range(5000):
        batch = [new_event("open", "fromdisk", f"r{record}-{i}") for i in range(30)]
        assert spool.append(codec.encode_job([codec.encode_event(e) for e in batch]))
        events += len(batch)
    on_disk = spool.pending_bytes
    spool.close()
    consumer = start_consumer(settings, tmp_path / "consumer.log")
    started = time.monotonic()
    replay = trackbuf(settings, "spool", "replay", "--dir", str(directory))
    replayed_s = time.monotonic() - started
    assert replay.returncode == 0, replay.stderr

    async def stored() -> tuple[int, int]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, count(DISTINCT recipient) AS d FROM events"
                " WHERE campaign = 'fromdisk'"
            )
        finally:
            await conn.close()
        assert row is not None
        return int(row["n"]), int(row["d"])

    deadline = time.monotonic() + 120
    while (counts := asyncio.run(stored()))[0] < events and time.monotonic() < deadline:
        time.sleep(0.2)
    drained_s = time.monotonic() - started
    report(
        "drain from disk",
        f"events={events} bytes_on_disk={on_disk} ({on_disk / events:.0f} per event) "
        f"replayed_in={replayed_s:.1f}s ({events / replayed_s:,.0f}/s) "
        f"stored_in={drained_s:.1f}s ({events / drained_s:,.0f}/s)",
        f"stored={counts[0]} distinct={counts[1]}",
    )
    assert counts == (events, events)
    assert consumer.terminate() == 0
