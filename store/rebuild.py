"""What ``trackbuf rollups rebuild`` runs (``commands/rollups.py``): classify events
stored before classification existed (or all of them, after a rules update, with
``--reclassify``) and recount a campaign's rollups from its raw events. Hours before
the retention watermark (months ``prune`` dropped) keep the counts they have: their
events are gone, and the rollups are all that is left of them. Without a rules change,
a rebuild gives exactly the counts the inserts made: both follow the definitions in
docs/ANALYTICS.md, and the burst rule is the same SQL (``burst_mark``).

Each campaign is rebuilt in one transaction that holds the rollup tables: consumers
wait (their jobs stay reserved or queued, nothing is lost) and count their batches
after it commits, so no event is counted twice or missed.
"""

from __future__ import annotations

from typing import Protocol

import asyncpg

from store.sql import query

CHUNK = 10_000  # events classified per round trip


# What a rebuild needs of the consumer's classifier (consumer/classify.py): the verdict
# on each event and the burst rule's parameters. The command passes the classifier in,
# so the database side does not import the consumer.
class Verdict(Protocol):
    @property
    def reason(self) -> str | None: ...
    @property
    def client(self) -> str: ...
    @property
    def proxy(self) -> str | None: ...


class BurstRule(Protocol):
    @property
    def window_seconds(self) -> float: ...
    @property
    def min_links(self) -> int: ...


class Rules(Protocol):
    @property
    def burst(self) -> BurstRule: ...


class Judge(Protocol):
    @property
    def rules(self) -> Rules: ...
    def classify(self, user_agent: str | None, ip: str | None) -> Verdict: ...


async def campaigns(conn: asyncpg.Connection) -> list[str]:
    """Every campaign with stored events, for a rebuild of all of them."""
    return [r["campaign"] for r in await conn.fetch(query("rebuild_campaigns"))]


async def rebuild_campaign(
    conn: asyncpg.Connection, campaign: str, reclassify: bool, judge: Judge
) -> int:
    """Rebuild one campaign; returns how many events were (re)classified."""
    burst = judge.rules.burst
    classified = 0
    async with conn.transaction():
        await conn.execute(query("rebuild_lock"))
        cursor = conn.cursor(query("rebuild_to_classify"), campaign, reclassify)
        chunk: list[asyncpg.Record] = []
        async for row in cursor:
            chunk.append(row)
            if len(chunk) == CHUNK:
                classified += await _set_verdicts(conn, chunk, judge)
                chunk = []
        classified += await _set_verdicts(conn, chunk, judge)
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


async def _set_verdicts(conn: asyncpg.Connection, rows: list[asyncpg.Record], judge: Judge) -> int:
    if not rows:
        return 0
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
