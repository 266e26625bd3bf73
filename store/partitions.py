"""Monthly partitions of ``events``: made ahead of time, dropped whole when old.

``events`` is partitioned by month of ``occurred_at`` (migration 0009). The SQL function
``trackbuf_ensure_event_partitions`` makes the current month's partition, the next two
and a DEFAULT one (which takes any event no month covers, so no insert is refused); a
consumer calls it at start and hourly (``ensure_loop``), ``trackbuf migrate`` at every
run. ``trackbuf prune`` (``prune`` here; the command around it is ``commands/prune.py``)
drops month partitions that lie wholly before its cutoff: a ``DROP TABLE`` of a
partition is instant, where a DELETE of the same rows would scan, write WAL and leave
bloat. Before the drops it advances the retention watermark (the
insert skips events older than it from then on); after them it deletes the
``first_events`` rows of recipients no stored event names any more, and marks the
others as counted in a pruned month. Rollups are never touched: they are all that is
left of a pruned month. It lists partitions through ``pg_inherits`` of ``events``,
so no other table (rollups, dead letters...) is ever touched.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from store.database import Database
from store.sql import query
from store.upkeep import repeat_until_stopped
from trackbuf.log import kv

log = logging.getLogger("trackbuf.store.partitions")

# Two months are made ahead, so an hourly round that fails for weeks loses nothing.
ENSURE_INTERVAL_S = 3600.0
# ...but a failed round is retried soon: while a month has no partition its events go
# to DEFAULT, and every later attempt has more of them to move.
ENSURE_RETRY_S = 5.0
ENSURE_LOCK_TIMEOUT = "5s"
# A DROP waits for the lock on events, and inserts queue behind it: better give up
# (and say so) than stall the consumer behind a transaction left open.
LOCK_TIMEOUT = "10s"
DEFAULT_PARTITION = "events_default"


def ensure_loop(database_url: str, stop: threading.Event) -> None:
    """Make the coming months' partitions now and every ENSURE_INTERVAL_S until ``stop``;
    a round that failed is tried again after ENSURE_RETRY_S."""

    def ensure(db: Database) -> None:
        # Making a partition moves that month's rows out of DEFAULT and needs a lock on
        # it that every insert routed there also takes: better fail (and retry soon)
        # than hold the inserts queued behind a long wait.
        db.execute(f"SET lock_timeout = '{ENSURE_LOCK_TIMEOUT}'")
        made = db.execute(query("ensure_event_partitions"))
        log.debug(kv("event_partitions_checked", status=made))

    repeat_until_stopped(database_url, stop, ENSURE_INTERVAL_S, ensure,
                         "event_partitions_failed", retry_s=ENSURE_RETRY_S)  # fmt: skip


class PruneError(Exception):
    """Prune could not finish; the message says what was dropped and what to do."""


@dataclass(frozen=True)
class Pruned:
    cutoff: datetime
    dropped: tuple[str, ...]
    default_rows: int  # rows of pruned months deleted from the DEFAULT partition
    kept: int  # month partitions left
    first_events: int = 0  # first-event rows of recipients no stored event names


async def prune(database_url: str, older_than: timedelta) -> Pruned:
    """Drop every month partition whose upper bound is at or before now - older_than."""
    conn = await asyncpg.connect(database_url)
    try:
        now: datetime = await conn.fetchval("SELECT now()")
        cutoff = now - older_than
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table"
            " WHERE partrelid = to_regclass('events'))"
        ):
            raise PruneError("events is not partitioned: run `trackbuf migrate` first")
        # Whole months go: everything before the start of the cutoff's month. From the
        # moment this commits, the insert skips events older than it (a redelivery of
        # a month about to go would be stored in DEFAULT and counted twice).
        watermark: datetime = await conn.fetchval(
            "SELECT date_trunc('month', $1::timestamptz AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
            cutoff,
        )
        await conn.fetchval(query("retention_advance"), watermark)
        # Wait out inserts that began before it (they may still store such an event):
        # what they store is then dropped below, its counts kept as history.
        await _lock(conn, "LOCK TABLE events IN SHARE MODE", "events", [])
        partitions = await conn.fetch(query("event_partitions"))
        dropped: list[str] = []
        kept = 0
        for row in partitions:
            upper = row["upper_bound"]
            if upper is None:
                continue  # the DEFAULT partition, handled below
            if upper > cutoff:
                kept += 1
                continue
            await _lock(conn, f'DROP TABLE "{row["name"]}"', row["name"], dropped)
            log.info(kv("event_partition_dropped", partition=row["name"]))
            dropped.append(row["name"])
        # The DEFAULT partition holds only events no month covered (a wrong clock, say):
        # few rows, so a DELETE of its old ones is cheap, and retention covers them too.
        default_rows = 0
        if any(r["name"] == DEFAULT_PARTITION for r in partitions):
            status = await conn.execute(
                f"DELETE FROM {DEFAULT_PARTITION} WHERE occurred_at < $1", watermark
            )
            default_rows = int(status.rsplit(" ", 1)[1])
        # first_events of what was dropped: held while it runs, so no insert claims a
        # first of a recipient between the look at events and the change.
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            await conn.execute("LOCK TABLE first_events IN EXCLUSIVE MODE")
            firsts = await conn.fetchrow(query("retention_firsts"), watermark)
        log.info(kv("first_events_pruned", dropped=firsts["dropped"], carried=firsts["carried"]))
    except asyncpg.LockNotAvailableError:
        raise PruneError(
            f"first_events stayed locked for {LOCK_TIMEOUT} (a rebuild running?); "
            f"dropped: {', '.join(dropped) or 'nothing'}; run the same command again"
        ) from None
    finally:
        await conn.close()
    return Pruned(cutoff, tuple(dropped), default_rows, kept, firsts["dropped"])


async def _lock(conn: asyncpg.Connection, sql: str, name: str, dropped: list[str]) -> None:
    """Run ``sql`` in a transaction of its own, waiting at most LOCK_TIMEOUT for its lock."""
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            await conn.execute(sql)
    except asyncpg.LockNotAvailableError:
        done = ", ".join(dropped) or "nothing"
        raise PruneError(
            f"{name} stayed locked for {LOCK_TIMEOUT} (a transaction left "
            f"open on events?); dropped so far: {done}; run the same command again"
        ) from None
