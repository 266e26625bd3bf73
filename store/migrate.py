"""The schema: apply the numbered SQL files in ``migrations/`` once each (what
``trackbuf migrate`` runs, from ``commands/migrate.py``; tests build databases with it).

Idempotent and safe to run concurrently (an advisory lock serialises migrators), so
every deployment can run it at start.

A migration is ``migrations/NNNN_what_it_does.sql``: four digits, then a name; a file
named otherwise is not a migration and is never applied. Numbers only ever grow, and
a number once applied somewhere is never reused or renumbered: ``trackbuf_migrations``
records versions, so a renamed file would run twice (or never). The gap from 0005 to
0009 is one of those: two changes were written in parallel, one took 0005 and the
other 0009 to stay clear of it, and both had been applied by the time they met. A new
migration takes the number after the highest one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from trackbuf.log import kv

log = logging.getLogger("trackbuf.migrate")

# Any constant works; it only has to be the same for every trackbuf migrator.
_LOCK_KEY = 0x747262756631
_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    found = []
    for entry in resources.files("store").joinpath("migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    return found


async def migrate(conn: asyncpg.Connection, up_to: int | None = None) -> list[int]:
    """Apply what is missing (up to version ``up_to``, when given: tests use it to
    build a database as an older release left it); returns the versions applied."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS trackbuf_migrations (
                   version    int PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            row["version"] for row in await conn.fetch("SELECT version FROM trackbuf_migrations")
        }
        for migration in available():
            if migration.version in done or (up_to is not None and migration.version > up_to):
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO trackbuf_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info(kv("migration_applied", version=migration.version, name=migration.name))
            applied_now.append(migration.version)
        # Every deploy also makes the coming months' partitions of events (consumers do
        # it hourly too; see store/partitions.py).
        if await conn.fetchval("SELECT to_regproc('trackbuf_ensure_event_partitions')"):
            await conn.execute("SELECT trackbuf_ensure_event_partitions(2)")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


async def run(database_url: str) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
