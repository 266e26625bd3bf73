"""``trackbuf rollups rebuild``: recount the rollups from the raw events, one campaign
at a time, in ``store/rebuild.py``'s transactions."""

from __future__ import annotations

import logging

import asyncpg

from store import rebuild
from store.rebuild import Judge
from trackbuf.log import kv

log = logging.getLogger("trackbuf.rebuild")


async def run(database_url: str, campaign: str | None, reclassify: bool, judge: Judge) -> int:
    """Rebuild one campaign or every one, saying so as each is done; ``judge`` is the
    consumer's classifier, configured as the consumer runs it."""
    conn = await asyncpg.connect(database_url)
    try:
        campaigns = await rebuild.campaigns(conn) if campaign is None else [campaign]
        for name in campaigns:
            classified = await rebuild.rebuild_campaign(conn, name, reclassify, judge)
            log.info(kv("rollups_rebuilt", campaign=name, classified=classified))
            print(f"campaign {name}: rollups rebuilt, {classified} event(s) classified")
    finally:
        await conn.close()
    if not campaigns:
        print("no events: nothing to rebuild")
    return 0
