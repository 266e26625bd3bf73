"""The labelled corpus of real fetches (tests/data/fetch_corpus.csv) through the real
pipeline: each row is sent as a pixel fetch to a real ingest behind a trusted proxy
(its address in X-Forwarded-For, its method, agent and headers as they were), through
beanstalkd and a real consumer into PostgreSQL; the stored rows say which kind of
fetch each one was taken for.

Targets (docs/ANALYTICS.md, "The corpus"): people and people through a proxy are kept
in people's figures for at least 99% of rows; machines that one request can tell are
kept out of them for at least 90%. A HEAD request is answered and never recorded, so
it is out of people's figures by construction. The rows one request cannot decide
(reason empty) are reported, not scored.
"""

from __future__ import annotations

import asyncio
import csv
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.procs import Process, start_ingest
from trackbuf import links
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parents[1] / "data" / "fetch_corpus.csv"
CAMPAIGN = "corpus"


def corpus() -> list[dict[str, str]]:
    with CORPUS.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


async def send(base: str, keyring: Keyring, rows: list[dict[str, str]]) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as session:
        for n, row in enumerate(rows):
            url = links.open_url(base, keyring, CAMPAIGN, f"row-{n}")
            headers = {"X-Forwarded-For": row["ip"], **json.loads(row["headers"] or "{}")}
            if row["user_agent"]:
                headers["User-Agent"] = row["user_agent"]
            async with session.request(row["method"], url, headers=headers) as response:
                await response.read()
                statuses.append(response.status)
    return statuses


async def stored(dsn: str, expected: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        conn = await asyncpg.connect(dsn)
        try:
            found = await conn.fetch(
                "SELECT recipient, machine, machine_reason, proxy, host(ip) AS ip FROM events"
                " WHERE campaign = $1", CAMPAIGN)  # fmt: skip
        finally:
            await conn.close()
        if len(found) >= expected or time.monotonic() > deadline:
            return {r["recipient"]: r for r in found}
        await asyncio.sleep(0.3)


def kind_of(row: Any | None) -> str:
    if row is None:
        return "not recorded"
    if row["machine"]:
        return "machine"
    return "proxied" if row["proxy"] else "person"


def test_the_corpus_through_the_pipeline_meets_its_targets(
    make_settings, keyring: Keyring, tmp_path: Path
) -> None:
    rows = corpus()
    settings: Settings = make_settings(trust_forwarded=True, threads=2)
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    try:
        statuses = asyncio.run(send(f"http://{settings.listen}", keyring, rows))
        recorded = sum(1 for r in rows if r["method"] == "GET")
        found = asyncio.run(stored(settings.database_url, recorded))
    finally:
        consumer.terminate()
        ingest.terminate()
    assert statuses == [200] * len(rows)
    assert len(found) == recorded

    results: Counter[tuple[str, str, str]] = Counter()
    misses = []
    for n, row in enumerate(rows):
        got = kind_of(found.get(f"row-{n}"))
        people = row["expected"] in ("person", "proxied")
        category = row["reason"] or ("-" if people else "(one request cannot tell)")
        results[(row["expected"], category, got)] += 1
        kept_right = got in ("person", "proxied") if people else got in ("machine", "not recorded")
        if not kept_right:
            misses.append((row["expected"], row["reason"], got, row["user_agent"][:70], row["ip"]))
    for key, count in sorted(results.items()):
        print("corpus", *key, count)  # the figures docs/ANALYTICS.md shows

    def share(expected: set[str], decidable_only: bool) -> float:
        chosen = [(n, r) for n, r in enumerate(rows) if r["expected"] in expected
                  and (r["reason"] or not decidable_only)]  # fmt: skip
        good = 0
        for n, row in chosen:
            got = kind_of(found.get(f"row-{n}"))
            people = row["expected"] in ("person", "proxied")
            good += (got in ("person", "proxied")) if people else (got != "person")
        return good / len(chosen)

    people = share({"person", "proxied"}, decidable_only=False)
    machines = share({"machine"}, decidable_only=True)
    print(f"corpus people kept {people:.1%}, decidable machines caught {machines:.1%}")
    assert people >= 0.99, misses
    assert machines >= 0.90, misses
    # Proxied people are told apart from direct ones, and named by their proxy.
    proxied = [n for n, r in enumerate(rows) if r["expected"] == "proxied"]
    assert all(kind_of(found[f"row-{n}"]) == "proxied" for n in proxied), misses
