"""A small load driver for fault tests: every request unique, every answer recorded.

Each request carries its own recipient, so after a fault the test can say exactly
which acknowledged events are missing (lost) or stored twice (duplicated).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import aiohttp
import asyncpg

from trackbuf import links
from trackbuf.tokens import Keyring


@dataclass
class LoadResult:
    sent: int = 0
    acked: set[str] = field(default_factory=set)
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    # (time.monotonic() when the request was sent, latency) of each acknowledged one
    samples: list[tuple[float, float]] = field(default_factory=list)

    def p99(self) -> float:
        return _p99(self.latencies)

    def p99_between(self, start: float, end: float) -> float:
        """p99 latency of the requests sent in [start, end) (time.monotonic())."""
        return _p99([latency for at, latency in self.samples if start <= at < end])


def _p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[max(int(len(ordered) * 0.99) - 1, 0)] if ordered else 0.0


async def _drive(
    base: str, keyring: Keyring, campaign: str, count: int, rate: float, concurrency: int
) -> LoadResult:
    result = LoadResult()
    started = time.monotonic()
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=10)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        recipient = f"{campaign}-r{i}"
        if i % 4 == 0:
            url = links.click_url(base, keyring, campaign, recipient, f"https://shop.example/{i}")
        else:
            url = links.open_url(base, keyring, campaign, recipient)
        async with gate:
            t0 = time.monotonic()
            try:
                async with session.get(url, allow_redirects=False) as response:
                    await response.read()
                    ok = response.status in (200, 302)
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                result.acked.add(recipient)
                result.latencies.append(time.monotonic() - t0)
                result.samples.append((t0, result.latencies[-1]))
            else:
                result.failed += 1

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        for i in range(count):
            # Pace to `rate` requests/s so the load spans the fault window.
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, i)))
            result.sent += 1
        await asyncio.gather(*tasks)
    return result


class Load:
    """Runs the driver in a background thread while the test injects faults."""

    def __init__(
        self, base: str, keyring: Keyring, campaign: str, count: int, rate: float,
        concurrency: int = 16,
    ) -> None:  # fmt: skip
        self.result: LoadResult | None = None
        self._args = (base, keyring, campaign, count, rate, concurrency)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.result = asyncio.run(_drive(*self._args))

    def start(self) -> Load:
        self._thread.start()
        return self

    def wait(self, timeout: float = 120) -> LoadResult:
        self._thread.join(timeout)
        assert self.result is not None, "load did not finish"
        return self.result


@dataclass
class Audit:
    acked: int
    stored: int
    lost: int
    duplicated: int
    # Rows in dead_letters (any campaign): a redelivery refused instead of skipped as a
    # duplicate would land there while the row counts still looked right.
    dead_letters: int = 0

    def __str__(self) -> str:
        return (
            f"acked={self.acked} stored={self.stored} lost={self.lost} "
            f"duplicated={self.duplicated} dead_letters={self.dead_letters}"
        )


async def _audit(dsn: str, campaign: str, acked: set[str]) -> Audit:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT recipient, count(*) AS n FROM events WHERE campaign = $1 GROUP BY 1", campaign
        )
        dead_letters = await conn.fetchval("SELECT count(*) FROM dead_letters")
    finally:
        await conn.close()
    stored = {row["recipient"]: row["n"] for row in rows}
    return Audit(
        acked=len(acked),
        stored=sum(stored.values()),
        lost=len(acked - stored.keys()),
        duplicated=sum(n - 1 for n in stored.values() if n > 1),
        dead_letters=dead_letters,
    )


def audit_until_settled(dsn: str, campaign: str, acked: set[str], timeout: float = 60) -> Audit:
    """Wait for the backlog to drain (nothing lost any more), then report."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            report = asyncio.run(_audit(dsn, campaign, acked))
        except (OSError, asyncpg.PostgresError):
            report = Audit(len(acked), 0, len(acked), 0)
        if report.lost == 0 or time.monotonic() > deadline:
            return report
        time.sleep(0.25)
