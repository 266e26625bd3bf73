"""``trackbuf rollups rebuild``: classify events stored before classification existed
(or all of them, after a rules update, with ``--reclassify``) and recount a campaign's
rollups from its raw events. Hours before the retention watermark (months ``prune``
dropped) keep the counts they have: their events are gone, and the rollups are all that
is left of them. Without a rules change, a rebuild gives exactly the counts the inserts
made: both follow the definitions in docs/ANALYTICS.md, and the burst rule is the same
SQL (``burst_mark``).

Each campaign is rebuilt in one transaction that holds the rollup tables: consumers
wait (their jobs stay reserved or queued, nothing is lost) and count their batches
after it commits, so no event is counted twice or missed.
"""

from __future__ import annotations

import logging

import asyncpg

from consumer.classify import classifier
from consumer.sql import query
from trackbuf.log import kv

log = logging.getLogger("trackbuf.rebuild")

CHUNK = 10_000  # events classified per round trip


async def rebuild_campaign(conn: asyncpg.Connection, campaign: str, reclassify: bool) -> int:
    """Rebuild one campaign; returns how many events were (re)classified."""
    judge = classifier()
    burst = judge.rules.burst
    classified = 0
    async with conn.transaction():
        await conn.execute(query("rebuild_lock"))
        cursor = conn.cursor(query("rebuild_to_classify"), campaign, reclassify)
        chunk: list[asyncpg.Record] = []
        async for row in cursor:
            chunk.append(row)
            if len(chunk) == CHUNK:
                classified += await _set_verdicts(conn, chunk)
                chunk = []
        classified += await _set_verdicts(conn, chunk)
        # The burst rule as the insert applies it (one SQL definition, burst_mark), over
        # every clicker of the campaign.
        clickers = await conn.fetchrow(query("rebuild_clickers"), campaign)
        await conn.execute(
            query("burst_mark"),
            clickers["campaigns"],
            clickers["recipients"],
            burst.window_seconds,
            burst.min_links,
        )
        for step in ("clear_firsts", "clear_rollups", "clear_breakdown", "firsts", "rollups",
                     "breakdown"):  # fmt: skip
            await conn.execute(query(f"rebuild_{step}"), campaign)
    return classified


async def _set_verdicts(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> int:
    if not rows:
        return 0
    judge = classifier()
    verdicts = [judge.classify(r["user_agent"], r["ip"]) for r in rows]
    await conn.execute(
        query("rebuild_set_verdicts"),
        [r["event_id"] for r in rows],
        [r["occurred_at"] for r in rows],
        [v.reason for v in verdicts],
        [v.client for v in verdicts],
        [v.proxy for v in verdicts],
    )
    return len(rows)


async def run(database_url: str, campaign: str | None, reclassify: bool) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        if campaign is None:
            campaigns = [r["campaign"] for r in await conn.fetch(query("rebuild_campaigns"))]
        else:
            campaigns = [campaign]
        for name in campaigns:
            classified = await rebuild_campaign(conn, name, reclassify)
            log.info(kv("rollups_rebuilt", campaign=name, classified=classified))
            print(f"campaign {name}: rollups rebuilt, {classified} event(s) classified")
    finally:
        await conn.close()
    if not campaigns:
        print("no events: nothing to rebuild")
    return 0
