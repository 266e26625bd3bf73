"""``trackbuf events [--tail]``: the most recently stored events, and new ones as they come."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import asyncpg

from store.sql import query

TAIL_POLL_S = 1.0
TAIL_OVERLAP = timedelta(seconds=10)
COLUMNS = ("stored_at", "kind", "campaign", "recipient", "url", "ip", "user_agent")


async def events(database_url: str, limit: int, tail: bool) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        rows = list(reversed(await conn.fetch(query("recent_events"), limit)))
        print("\t".join(COLUMNS), flush=True)
        _print(rows)
        if not tail:
            return 0
        # stored_at is each batch's transaction start, and batches from different
        # threads commit out of order: re-read an overlap window and skip rows seen.
        seen = {row["event_id"]: row["stored_at"] for row in rows}
        since = rows[-1]["stored_at"] - TAIL_OVERLAP if rows else datetime.fromtimestamp(0, UTC)
        while True:
            await asyncio.sleep(TAIL_POLL_S)
            fresh = await conn.fetch(query("events_since"), since, 10_000)
            new = [row for row in fresh if row["event_id"] not in seen]
            _print(new)
            for row in new:
                seen[row["event_id"]] = row["stored_at"]
            if fresh:
                since = fresh[-1]["stored_at"] - TAIL_OVERLAP
                seen = {k: v for k, v in seen.items() if v >= since}
    finally:
        await conn.close()


def _print(rows: Iterable[asyncpg.Record]) -> None:
    for row in rows:
        cells = []
        for column in COLUMNS:
            value = row[column]
            if isinstance(value, datetime):
                value = value.isoformat(timespec="milliseconds")
            cells.append("" if value is None else str(value))
        print("\t".join(cells), flush=True)
