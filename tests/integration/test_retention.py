"""Monthly partitions of events: an existing table converted in place, and `prune`."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from consumer.writer import EventWriter
from store.migrate import migrate
from tests.conftest import new_database
from tests.procs import trackbuf
from tests.servers import Postgres
from trackbuf import settings as tsettings

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
# Months ago each row happened: old ones that prune must drop, recent ones it keeps.
AGES_DAYS = (400, 370, 300, 250, 200, 100, 40, 3, 0)
PER_MONTH = 25


async def _release_0004_table(dsn: str) -> list[tuple[uuid.UUID, datetime]]:
    """A database as the release before 0009 left it, filled across months."""
    conn = await asyncpg.connect(dsn)
    try:
        # A database of its own, built with migrations up to 0004 only.
        # Whatever later migrations added (tables, views, functions) goes with the schema.
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        assert await migrate(conn, up_to=4) == [1, 2, 3, 4]
        assert not await conn.fetchval("SELECT count(*) FROM pg_partitioned_table")
        # A column the conversion knows nothing of must be kept, with its values.
        await conn.execute("ALTER TABLE events ADD COLUMN test_note text DEFAULT 'kept'")
        keys = []
        for days in AGES_DAYS:
            for i in range(PER_MONTH):
                at = NOW - timedelta(days=days, seconds=i)
                event_id = uuid.uuid4()
                await conn.execute(
                    "INSERT INTO events (event_id, kind, occurred_at, campaign, recipient,"
                    " url, user_agent, ip) VALUES ($1, 'click', $2, 'spring', $3,"
                    " 'https://shop.example/', 'Mozilla/5.0', '10.0.0.1')",
                    event_id, at, f"user-{days}-{i}",
                )  # fmt: skip
                keys.append((event_id, at))
        return keys
    finally:
        await conn.close()


def event(event_id: uuid.UUID, at: datetime, recipient: str) -> dict[str, object]:
    """One event as ingest puts it in a job."""
    return {"id": str(event_id), "k": "click", "t": at.isoformat(), "c": "spring",
            "r": recipient, "u": "https://shop.example/", "ua": "x", "ip": None}  # fmt: skip


async def _fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    return asyncio.run(_fetch(dsn, sql))


def test_an_existing_table_is_partitioned_in_place_and_prune_drops_only_old_months(
    postgres: Postgres,
) -> None:
    dsn = new_database(postgres)
    keys = asyncio.run(_release_0004_table(dsn))
    before = fetch(dsn, "SELECT * FROM events ORDER BY event_id")

    async def full_migrate() -> list[int]:
        conn = await asyncpg.connect(dsn)
        try:
            return await migrate(conn)
        finally:
            await conn.close()

    assert 9 in asyncio.run(full_migrate())
    # Every row is there exactly once, every column as it was.
    after = fetch(dsn, "SELECT * FROM events ORDER BY event_id")
    # (Later migrations may add columns: compare the ones the old table had.)
    assert [{k: r[k] for k in dict(before[0])} for r in after] == [dict(r) for r in before]
    assert {r["test_note"] for r in after} == {"kept"}
    assert len(after) == len(keys) == len({k for k, _ in keys})
    assert fetch(dsn, "SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'events'::regclass")
    parts = fetch(dsn, "SELECT c.relname FROM pg_inherits i JOIN pg_class c"
                       " ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass")  # fmt: skip
    months = {r["relname"] for r in parts}
    assert "events_default" in months
    for ahead in (0, 1, 2):  # this month and the next two exist already
        first = (NOW.replace(day=1) + timedelta(days=32 * ahead)).strftime("%Y%m")
        assert f"events_p{first}" in months
    assert not fetch(dsn, "SELECT 1 FROM events_default")  # every row found its month

    # A replayed event (same event_id and occurred_at) is still a no-op via the
    # consumer's own insert, whichever partition holds it.
    replay_id, replay_at = keys[0]
    job = {"v": 1, "e": [event(replay_id, replay_at, "someone-else")]}
    db = EventWriter(dsn)
    try:
        assert db.insert_jobs([json.dumps(job).encode()], 1).inserted == 0
    finally:
        db.close()
    assert len(fetch(dsn, "SELECT 1 FROM events")) == len(keys)

    # prune: whole months older than 180 days go, the rest stays; twice is harmless.
    settings = tsettings.load({}, overrides={"database_url": dsn})
    done = trackbuf(settings, "prune", "--older-than", "180d")
    assert done.returncode == 0, done.stderr
    cutoff = NOW - timedelta(days=180)
    month_end = {
        r["name"]: r["upper_bound"]
        for r in fetch(dsn, "SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid)"
                            " AS upper_bound FROM pg_inherits i JOIN pg_class c"
                            " ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass")
    }  # fmt: skip
    dropped = [line.split()[-1] for line in done.stdout.splitlines() if "dropped" in line]
    assert dropped, done.stdout
    for name in dropped:
        assert name not in month_end
        end = datetime.strptime(name.removeprefix("events_p"), "%Y%m").replace(tzinfo=UTC)
        end = (end + timedelta(days=32)).replace(day=1)
        assert end <= cutoff, (name, cutoff)  # wholly older than the cutoff
    left = fetch(dsn, "SELECT event_id, occurred_at FROM events")
    # No row newer than the cutoff is gone; every row left is in a month that ends
    # after the cutoff.
    kept_ids = {r["event_id"] for r in left}
    assert {k for k, at in keys if at >= cutoff} <= kept_ids
    for r in left:
        month_end_at = (r["occurred_at"].replace(day=1) + timedelta(days=32)).replace(day=1)
        assert month_end_at > cutoff
    assert {k for k, at in keys if at < cutoff.replace(day=1)}.isdisjoint(kept_ids)
    again = trackbuf(settings, "prune", "--older-than", "180d")
    assert again.returncode == 0 and "nothing to drop" in again.stdout, again.stdout
    # Other tables are never touched.
    assert fetch(dsn, "SELECT to_regclass('dead_letters') IS NOT NULL AS t")[0]["t"]

    # forget still works against the partitioned table.
    someone = next(r for r in fetch(dsn, "SELECT recipient FROM events LIMIT 1"))["recipient"]
    gone = trackbuf(settings, "forget", "--recipient", someone)
    assert gone.returncode == 0 and "events" in gone.stdout, gone.stdout + gone.stderr
    assert not fetch(dsn, f"SELECT 1 FROM events WHERE recipient = '{someone}'")


def test_an_event_of_an_unexpected_month_is_stored_and_moved_when_its_month_comes(
    database_url: str,
) -> None:
    far = NOW + timedelta(days=400)
    job = {"v": 1, "e": [event(uuid.uuid4(), far, "user-1")]}
    db = EventWriter(database_url)
    try:
        assert db.insert_jobs([json.dumps(job).encode()], 1).inserted == 1
        assert db.execute("SELECT trackbuf_event_partition($1)", far) == "SELECT 1"
    finally:
        db.close()
    name = f"events_p{far.strftime('%Y%m')}"
    assert not fetch(database_url, "SELECT 1 FROM events_default")
    assert len(fetch(database_url, f"SELECT 1 FROM {name}")) == 1


def test_prune_refuses_a_bad_duration(database_url: str) -> None:
    settings = tsettings.load({}, overrides={"database_url": database_url})
    done = trackbuf(settings, "prune", "--older-than", "soon")
    assert done.returncode == 2 and "duration" in done.stderr and "Traceback" not in done.stderr


def test_8_a_month_partition_that_failed_to_be_made_is_retried_promptly(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer's partition round fails (here: DEFAULT stays locked, as a long insert
    routed into it would keep it): the round is tried again within seconds, not an hour
    later, and the month's partition is made once the lock goes."""
    import threading
    import time

    from store import partitions

    monkeypatch.setattr(partitions, "ENSURE_LOCK_TIMEOUT", "1s")
    ahead = (NOW.replace(day=1) + timedelta(days=64)).replace(day=1)
    name = f"events_p{ahead.strftime('%Y%m')}"
    fetch(database_url, f"DROP TABLE {name}")  # empty: two months ahead
    stop = threading.Event()
    loop = threading.Thread(target=partitions.ensure_loop, args=(database_url, stop))

    async def hold_default() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE events_default IN ACCESS EXCLUSIVE MODE")
                loop.start()
                await asyncio.sleep(3)  # the first round gives up after 1 s
            assert not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
        finally:
            await conn.close()

    try:
        asyncio.run(hold_default())
        deadline = time.monotonic() + 60  # the retry is due 5 s after the failure
        while time.monotonic() < deadline:
            if fetch(database_url, f"SELECT to_regclass('{name}') IS NOT NULL AS made")[0]["made"]:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        loop.join(30)
    assert fetch(database_url, f"SELECT to_regclass('{name}') IS NOT NULL AS made")[0]["made"]
