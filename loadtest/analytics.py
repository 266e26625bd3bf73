"""The report section: how long ``trackbuf stats`` takes for a campaign of millions.

One campaign of ``plan.report_events`` events (four opens to one click, a million
recipients at the full size, 20 links, 30 days, a share of them machines) is written
straight into ``events`` by SQL, its rollups are counted by ``trackbuf rollups
rebuild`` (the same counts the consumer keeps; tests/integration/test_rollups.py holds
the two to each other), and then the report is read the way the CLI reads it
(``store.reports.fetch`` on an open connection), several times per shape. The
command as a whole (a new Python process and connection) is timed too, separately:
most of that is Python starting up, whatever the campaign's size.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from loadtest import stack as st
from store import reports

CAMPAIGN = "big-campaign"
ROUNDS = 15

# Rows by SQL, in one statement per million: every fifth event a click on one of 20
# links; machine verdicts and clients in realistic shares (Apple's proxy on a third of
# opens, a link scanner on one click in twenty).
FILL = """
INSERT INTO events (event_id, kind, occurred_at, campaign, recipient, url, user_agent, ip,
                    machine, machine_reason, client)
SELECT gen_random_uuid(), kind, now() - (((i * 7919) % 2592000) || ' seconds')::interval,
       $1, 'r' || (i % $4), url, 'Mozilla/5.0', '203.0.113.7',
       reason IS NOT NULL, reason, CASE WHEN reason IS NULL THEN client END
FROM (
    SELECT i,
           CASE WHEN i % 5 = 0 THEN 'click' ELSE 'open' END AS kind,
           CASE WHEN i % 5 = 0 THEN 'https://shop.example/p/' || ((i / 5) % 20) END AS url,
           CASE WHEN i % 5 <> 0 AND i % 3 = 0 THEN 'apple_mpp'
                WHEN i % 5 = 0 AND i % 20 = 0 THEN 'security_scanner' END AS reason,
           (ARRAY['Apple Mail', 'Gmail', 'Outlook', 'Thunderbird'])[1 + i % 4] AS client
    FROM generate_series($2::bigint, $3::bigint - 1) AS i
) AS x
"""

SHAPES: dict[str, dict[str, Any]] = {
    "summary": {"by": None},
    "by link": {"by": "link"},
    "by day": {"by": "day"},
    "last 7 days, by day": {"by": "day", "days": 7},
}


async def _fill(dsn: str, events: int) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        step = 1_000_000
        for first in range(0, events, step):
            await conn.execute(FILL, CAMPAIGN, first, min(first + step, events),
                               max(events // 5, 1))  # fmt: skip
        await conn.execute("ANALYZE events")
        return time.perf_counter() - started
    finally:
        await conn.close()


async def _time_reports(dsn: str) -> dict[str, dict[str, float]]:
    conn = await asyncpg.connect(dsn)
    out: dict[str, dict[str, float]] = {}
    try:
        for name, shape in SHAPES.items():
            since = None
            if "days" in shape:
                since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - shape["days"] * 86400))
            period = reports.Period.parse(since, None, "UTC")
            timings = []
            for _ in range(ROUNDS):
                started = time.perf_counter()
                report, stored = await reports.fetch(conn, CAMPAIGN, period, shape["by"])
                timings.append((time.perf_counter() - started) * 1000)
                if not stored or not report["open"]["total"]:
                    raise RuntimeError(f"stats {name}: the report is empty")
            out[name] = {"median_ms": round(statistics.median(timings), 2),
                         "max_ms": round(max(timings), 2)}  # fmt: skip
    finally:
        await conn.close()
    return out


def bench_stats(work: Path, events: int) -> dict[str, Any]:
    stack = st.Stack.start(work, "stats")
    try:
        fill_s = asyncio.run(_fill(stack.dsn, events))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "commands", "rollups", "rebuild",
                        "--campaign", CAMPAIGN], env=stack.env(), check=True,
                       capture_output=True)  # fmt: skip
        rebuild_s = time.perf_counter() - started
        stored = int(str(stack.sql("SELECT count(*) FROM events")))
        counted = int(str(stack.sql(
            f"SELECT sum(total)::bigint FROM rollups WHERE campaign = '{CAMPAIGN}' AND url = ''"
        )))  # fmt: skip
        if stored != events or counted != events:
            raise RuntimeError(f"stats: {stored} rows, {counted} counted, {events} written")
        reports = asyncio.run(_time_reports(stack.dsn))
        cli = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "commands", "stats", "--campaign", CAMPAIGN],
                           env=stack.env(), check=True, capture_output=True)  # fmt: skip
            cli.append(time.perf_counter() - started)
        rollup_rows = int(str(stack.sql(
            f"SELECT count(*) FROM rollups WHERE campaign = '{CAMPAIGN}'"
        )))  # fmt: skip
        return {
            "events": events,
            "recipients": max(events // 5, 1),
            "rollup_rows": rollup_rows,
            "fill_s": round(fill_s, 1),
            "rebuild_s": round(rebuild_s, 1),
            "report_ms": reports,
            "cli_process_s": round(min(cli), 3),
        }
    finally:
        stack.close()
