"""``trackbuf stats --campaign C``: totals and unique recipients, human and machine."""

from __future__ import annotations

import asyncpg
import orjson

from consumer.sql import query

# User agents of fetchers that are not a person reading: mail image proxies, security
# link scanners, prefetchers and scripts. A pattern list, not a verdict: extend it.
MACHINE_AGENTS = (
    r"GoogleImageProxy|YahooMailProxy|ggpht\.com|bot\b|crawler|spider|"
    r"Barracuda|Mimecast|Proofpoint|python-requests|curl/|wget|Go-http-client|HeadlessChrome"
)


async def campaign(database_url: str, name: str, as_json: bool) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(query("campaign_stats"), name, MACHINE_AGENTS)
    finally:
        await conn.close()
    report = {
        row["kind"]: {
            "total": row["total"],
            "unique_recipients": row["unique_recipients"],
            "machine_total": row["machine_total"],
            "human_unique_recipients": row["human_unique_recipients"],
        }
        for row in rows
    }
    for kind in ("open", "click"):
        report.setdefault(kind, dict.fromkeys(("total", "unique_recipients", "machine_total",
                                               "human_unique_recipients"), 0))  # fmt: skip
    if as_json:
        # Same shape with or without events: zeros, never a sentence, for scripts.
        print(orjson.dumps({"campaign": name, **report}).decode())
        return 0
    if not rows:
        # Not an error (a campaign just sent has none yet), but a table of zeros
        # reads the same as a misspelt name; say it. Names are case-sensitive.
        print(f"no events stored for campaign {name!r} (names are case-sensitive; "
              "`trackbuf events` shows the latest rows)")  # fmt: skip
        return 0
    print(f"campaign {name}")
    print(f"{'':8}{'total':>10}{'unique':>10}{'machine':>10}{'human unique':>14}")
    for kind in ("open", "click"):
        r = report[kind]
        print(f"{kind + 's':8}{r['total']:>10,}{r['unique_recipients']:>10,}"
              f"{r['machine_total']:>10,}{r['human_unique_recipients']:>14,}")  # fmt: skip
    return 0
