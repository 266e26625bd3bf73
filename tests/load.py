"""A small load driver for fault tests: every request unique, every answer recorded.

Each request carries its own recipient, so after a fault the audit compares the rows
stored against the rows the acknowledged requests asked for, field by field (kind,
campaign, recipient, click target): what is missing (lost), what is there more than
once (duplicated), and what no request asked for (stray).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import aiohttp
import asyncpg

from trackbuf import links
from trackbuf.tokens import Keyring


@dataclass(frozen=True)
class Sent:
    """The row one request asks for, as the audit expects to find it exactly once."""

    kind: str
    campaign: str
    recipient: str
    url: str | None = None


def planned(campaign: str, i: int) -> Sent:
    """Request ``i`` of a load: its own recipient; every fourth a click, else an open."""
    recipient = f"{campaign}-r{i}"
    if i % 4 == 0:
        return Sent("click", campaign, recipient, f"https://shop.example/{i}")
    return Sent("open", campaign, recipient)


def _planned_for(campaign: str, recipient: str) -> Sent | None:
    """The request a load made for this recipient, if it is one of a load's."""
    number = recipient.removeprefix(f"{campaign}-r")
    return planned(campaign, int(number)) if number.isdigit() else None


@dataclass
class LoadResult:
    sent: int = 0
    acked: set[Sent] = field(default_factory=set)
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


Plan = Callable[[str, int], Sent]


async def _drive(
    bases: Sequence[str], keyring: Keyring, campaign: str, count: int, rate: float,
    concurrency: int, plan: Plan = planned,
) -> LoadResult:  # fmt: skip
    result = LoadResult()
    started = time.monotonic()
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=10)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        event = plan(campaign, i)
        base = bases[i % len(bases)]  # several ingests: spread like a round-robin balancer
        if event.url is not None:
            url = links.click_url(base, keyring, campaign, event.recipient, event.url)
        else:
            url = links.open_url(base, keyring, campaign, event.recipient)
        async with gate:
            t0 = time.monotonic()
            try:
                async with session.get(url, allow_redirects=False) as response:
                    await response.read()
                    ok = response.status in (200, 302)
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                result.acked.add(event)
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
        self, base: str | Sequence[str], keyring: Keyring, campaign: str, count: int, rate: float,
        concurrency: int = 16, plan: Plan = planned,
    ) -> None:  # fmt: skip
        self.result: LoadResult | None = None
        bases = [base] if isinstance(base, str) else list(base)
        # What request i is (planned: the audit can tell a failed request's row from a
        # stray one; another plan makes any stored row of a failed request stray).
        self._args = (bases, keyring, campaign, count, rate, concurrency, plan)
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
    # Acknowledged requests whose row (same kind, campaign, recipient and target) is
    # not stored.
    lost: int
    # Rows stored more than once. The table cannot hold one event_id twice, so these
    # are copies under new ids: one request recorded twice (say, a replay that
    # re-stamped its events), which ON CONFLICT (event_id) cannot catch.
    duplicated: int
    # Rows of the campaign that no request of the load asked for (a wrong kind or
    # target, a recipient never sent). A request that failed may still have been
    # stored (nothing is promised about it), so its row is not stray.
    stray: int = 0
    # Rows in dead_letters (any campaign): a redelivery refused instead of skipped as a
    # duplicate would land there while the row counts still looked right.
    dead_letters: int = 0

    def __str__(self) -> str:
        return (
            f"acked={self.acked} stored={self.stored} lost={self.lost} "
            f"duplicated={self.duplicated} stray={self.stray} dead_letters={self.dead_letters}"
        )


def compare(campaign: str, acked: Collection[Sent], stored: Counter[Sent]) -> Audit:
    """What the acknowledged requests asked for against the rows stored (with counts)."""
    wanted = set(acked)
    stray = sum(
        n
        for row, n in stored.items()
        if row not in wanted and _planned_for(campaign, row.recipient) != row
    )
    return Audit(
        acked=len(wanted),
        stored=sum(stored.values()),
        lost=len(wanted - stored.keys()),
        duplicated=sum(n - 1 for n in stored.values()),
        stray=stray,
    )


async def _audit(dsn: str, campaign: str, acked: Collection[Sent]) -> Audit:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT kind, recipient, url, count(*) AS n FROM events WHERE campaign = $1"
            " GROUP BY 1, 2, 3",
            campaign,
        )
        dead_letters = await conn.fetchval("SELECT count(*) FROM dead_letters")
    finally:
        await conn.close()
    stored = Counter(
        {Sent(row["kind"], campaign, row["recipient"], row["url"]): row["n"] for row in rows}
    )
    report = compare(campaign, acked, stored)
    report.dead_letters = dead_letters
    return report


def audit_until_settled(
    dsn: str, campaign: str, acked: Collection[Sent], timeout: float = 60
) -> Audit:
    """Wait for the backlog to drain (nothing lost any more), then report. A row no
    request asked for never goes away by waiting, so it fails the test here."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            report = asyncio.run(_audit(dsn, campaign, acked))
        except (OSError, asyncpg.PostgresError):
            report = Audit(len(acked), 0, len(acked), 0)
        if report.lost == 0 or time.monotonic() > deadline:
            assert report.stray == 0, f"rows stored that no request asked for: {report}"
            return report
        time.sleep(0.25)
