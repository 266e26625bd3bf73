"""Erasing a person's rows for good: ``forget`` (what ``trackbuf forget --recipient R
[--campaign C]`` runs, from ``commands/forget.py``) and the consumer's ``expire_loop``.

The order is the guarantee that nothing of R is stored afterwards:

1. A tombstone for R (and C, or every campaign) is committed. From then on every
   consumer insert skips R's events and R's dead letters in the same statement
   (``insert_jobs``, ``insert_dead_letter`` in queries.sql), so events still queued in
   beanstalkd, or spooled by an ingest and replayed later, are dropped.
2. A ``SHARE`` lock on the tables the consumer writes waits for every insert already
   running when the tombstone was committed (it may have missed the tombstone) to
   commit, then is let go at once: the consumer is held up only for that wait.
3. R's stored events are taken out of the rollups, and R's rows are deleted from every
   table in ``TARGETS``, in one transaction. Counts of R's events in months already
   pruned are anonymous history and stay.

Every step is idempotent: run again, the tombstone is renewed and 0 rows are deleted.
Tombstones expire after ``TRACKBUF_FORGET_KEEP_DAYS``; expired ones are deleted by the
command and by the consumer (``expire_loop``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from store.database import Database
from store.sql import query
from store.upkeep import repeat_until_stopped
from trackbuf.log import kv

log = logging.getLogger("trackbuf.store.forget")


@dataclass(frozen=True)
class Target:
    table: str
    # A condition on that table's rows: $1 is the recipient, $2 the campaign (NULL for
    # every campaign).
    where: str


# Every table that holds a person's events and how to find their rows in it. A table
# derived from events (a rollup keyed by recipient, say) that a later migration adds
# goes here as one more line; a table missing from the database is skipped, so a
# target may name a table that only some deployments have.
TARGETS = (
    Target("events", "recipient = $1 AND ($2::text IS NULL OR campaign = $2::text)"),
    # Dead letters keep the bytes received: match R inside them (see 0004_forget.sql).
    Target("dead_letters", "trackbuf_body_mentions(body, $1::text, $2::text)"),
    # Which recipients were first (for unique counts) names them too. The rollups hold
    # only counts, no recipient: the person's stored events are taken out of them first
    # (step 3 runs ``forget_uncount``), so every count stays what the stored events say
    # and the same person coming back after the tombstone expired is counted once.
    Target("first_events", "recipient = $1 AND ($2::text IS NULL OR campaign = $2::text)"),
)

# How long step 2 may wait for inserts in flight. New inserts queue behind the lock
# request, so a long wait (an operator's transaction left open on events) would stall
# the consumer: better give up and ask for a second run, which is harmless.
LOCK_TIMEOUT = "10s"
# How often a running consumer deletes expired tombstones.
EXPIRE_INTERVAL_S = 3600.0


class ForgetError(Exception):
    """The erasure could not finish; the message says what is in place and what to do."""


@dataclass(frozen=True)
class ForgetResult:
    recipient: str
    campaign: str | None
    deleted: tuple[tuple[str, int], ...]  # (table, rows) for each table present
    keep_until: datetime
    expired_tombstones: int

    @property
    def total(self) -> int:
        return sum(rows for _, rows in self.deleted)


async def forget(
    database_url: str, recipient: str, campaign: str | None, keep_days: int
) -> ForgetResult:
    conn = await asyncpg.connect(database_url)
    try:
        expired = _count(await conn.execute(query("forget_expire")))
        keep_until = await conn.fetchval(query("forget_tombstone"), recipient, campaign, keep_days)
        present = [t for t in TARGETS if await conn.fetchval("SELECT to_regclass($1)", t.table)]
        counted = bool(await conn.fetchval("SELECT to_regclass('event_retention')"))
        tables = ", ".join(t.table for t in present)
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                await conn.execute(f"LOCK TABLE {tables} IN SHARE MODE")
        except asyncpg.LockNotAvailableError:
            raise ForgetError(
                f"the tombstone is in place, but writes to {tables} did not finish within "
                f"{LOCK_TIMEOUT} (a transaction left open?); nothing was deleted yet: "
                "run the same command again"
            ) from None
        try:
            deleted = await _delete(conn, present, counted, recipient, campaign)
        except asyncpg.LockNotAvailableError:
            raise ForgetError(
                f"the tombstone is in place, but the rollups stayed locked for {LOCK_TIMEOUT} "
                "(a rebuild or prune running?); nothing was deleted yet: run the same "
                "command again"
            ) from None
    finally:
        await conn.close()
    return ForgetResult(recipient, campaign, tuple(deleted), keep_until, expired)


async def _delete(
    conn: asyncpg.Connection,
    present: list[Target],
    counted: bool,
    recipient: str,
    campaign: str | None,
) -> list[tuple[str, int]]:
    deleted = []
    async with conn.transaction():
        if counted:
            # The person's events leave the counts with them (forget_uncount), holding
            # the rollup tables as rebuild does, so no insert counts meanwhile.
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            await conn.execute(query("rebuild_lock"))
            await conn.execute(query("forget_uncount"), recipient, campaign)
            await conn.execute(query("forget_empty"), campaign)
        for target in present:
            status = await conn.execute(
                f"DELETE FROM {target.table} WHERE {target.where}", recipient, campaign
            )
            deleted.append((target.table, _count(status)))
    return deleted


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[1])  # "DELETE <rows>"


def expire_loop(database_url: str, stop: threading.Event) -> None:
    """Delete expired tombstones now and every EXPIRE_INTERVAL_S until ``stop``: a
    tombstone names a person, so it is not kept past its purpose even if ``forget`` is
    never run again."""

    def expire(db: Database) -> None:
        expired = _count(db.execute(query("forget_expire")))
        if expired:
            log.info(kv("tombstones_expired", count=expired))

    repeat_until_stopped(database_url, stop, EXPIRE_INTERVAL_S, expire, "tombstone_expiry_failed")
