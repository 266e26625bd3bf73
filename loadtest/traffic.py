"""Realistic email tracking traffic, bounded in count and time, loopback only.

Signed open and click URLs over many campaigns and recipients, user agents of real mail
clients and image proxies, and a rate that follows a profile:

- ``steady``: the same rate throughout;
- ``spike``: steady, with 10x the rate for the middle tenth of the run;
- ``burst``: a campaign send: the full rate at once, decaying exponentially.

Every request is unique (its own recipient) and every acknowledged one is recorded,
so loss can be counted against the database afterwards.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from trackbuf import links
from trackbuf.tokens import Keyring

# What actually fetches tracking pixels: proxies (Gmail, Apple Mail Privacy Protection,
# Outlook) far more than the recipient's own client.
USER_AGENTS = (  # real strings are long
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",  # noqa: E501
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36 Edg/120.0",  # noqa: E501
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Mobile Safari/537.36",  # noqa: E501
    "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
    "Thunderbird/115.5.0",
)
PROFILES = ("steady", "spike", "burst")


def rate_at(profile: str, rate: float, t: float, duration: float) -> float:
    """Requests per second wanted at second ``t`` of a ``duration``-second run."""
    if profile == "steady":
        return rate
    if profile == "spike":
        middle = duration * 0.45 <= t < duration * 0.55
        return rate * 10 if middle else rate
    if profile == "burst":
        return max(rate * math.exp(-3 * t / duration), rate * 0.02)
    raise ValueError(f"profile must be one of {PROFILES}")


def require_loopback(base_url: str) -> None:
    """Load goes to this machine only; anything else is refused before a request."""
    host = urlsplit(base_url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"load tests send traffic to loopback only, not {host!r}")


@dataclass
class Result:
    profile: str
    sent: int = 0
    acked: list[str] = field(default_factory=list)  # recipients, in answer order
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    per_second: dict[int, int] = field(default_factory=dict)  # second -> answers
    p99_per_second: dict[int, float] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return 0.0
        return ordered[min(int(len(ordered) * q), len(ordered) - 1)]

    def summary(self) -> dict[str, object]:
        return {
            "profile": self.profile,
            "sent": self.sent,
            "acknowledged": len(self.acked),
            "failed": self.failed,
            "elapsed_s": round(self.elapsed_s, 3),
            "rate_per_s": round(len(self.acked) / self.elapsed_s, 1) if self.elapsed_s else 0,
            "p50_ms": round(self.percentile(0.50) * 1000, 2),
            "p99_ms": round(self.percentile(0.99) * 1000, 2),
        }


URL_MIXES = ("open", "click", "mixed")


def wrk_paths(keyring: Keyring, count: int, mix: str = "open", run: str = "wrk") -> Iterator[str]:
    """Paths (no host) of ``count`` signed URLs for ``loadtest/wrk/urls.lua``: all
    opens, all clicks, or the generator's mix (one click in five)."""
    rng = random.Random(count)
    for i in range(count):
        if mix == "mixed":
            url, _ = make_url(_NO_HOST, keyring, run, i, rng)
        elif mix == "click":
            url = links.click_url(_NO_HOST, keyring, f"{run}-c{i % 40}", f"{run}-{i}@example.com",
                                  f"https://shop.example.com/p/{i % 500}")  # fmt: skip
        elif mix == "open":
            url = links.open_url(_NO_HOST, keyring, f"{run}-c{i % 40}", f"{run}-{i}@example.com")
        else:
            raise ValueError(f"mix must be one of {URL_MIXES}, got {mix!r}")
        yield url.removeprefix(_NO_HOST)


_NO_HOST = "http://x"


def make_url(base: str, keyring: Keyring, run: str, i: int, rng: random.Random) -> tuple[str, str]:
    """The i-th request of a run: (url, recipient). One click for every four opens."""
    campaign = f"{run}-c{rng.randrange(40)}"
    recipient = f"{run}-{i}@example.com"
    if rng.random() < 0.2:
        target = f"https://shop.example.com/p/{rng.randrange(500)}?utm_campaign={campaign}"
        return links.click_url(base, keyring, campaign, recipient, target), recipient
    return links.open_url(base, keyring, campaign, recipient), recipient


async def drive(
    base: str,
    keyring: Keyring,
    run: str,
    profile: str = "steady",
    rate: float = 500,
    duration_s: float = 10,
    max_requests: int = 100_000,
    concurrency: int = 64,
    seed: int = 1,
    on_tick: Callable[[float], None] | None = None,
) -> Result:
    """Send traffic for ``duration_s`` or ``max_requests``, whichever ends first."""
    require_loopback(base)
    rng = random.Random(seed)
    result = Result(profile)
    gate = asyncio.Semaphore(concurrency)
    second_latencies: dict[int, list[float]] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=10)
    started = time.monotonic()

    async def one(session: aiohttp.ClientSession, url: str, recipient: str) -> None:
        headers = {"User-Agent": rng.choice(USER_AGENTS)}
        async with gate:
            t0 = time.monotonic()
            try:
                async with session.get(url, allow_redirects=False, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status in (200, 302)
            except (aiohttp.ClientError, TimeoutError):
                ok = False
        if ok:
            done = time.monotonic()
            second = int(done - started)
            result.acked.append(recipient)
            result.latencies.append(done - t0)
            result.per_second[second] = result.per_second.get(second, 0) + 1
            second_latencies.setdefault(second, []).append(done - t0)
        else:
            result.failed += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: set[asyncio.Task[None]] = set()
        owed = 0.0
        last = started
        next_tick = started + 0.5
        while result.sent < max_requests:
            now = time.monotonic()
            t = now - started
            if t >= duration_s:
                break
            owed += rate_at(profile, rate, t, duration_s) * (now - last)
            last = now
            while owed >= 1 and result.sent < max_requests:
                owed -= 1
                url, recipient = make_url(base, keyring, run, result.sent, rng)
                task = asyncio.create_task(one(session, url, recipient))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                result.sent += 1
            if on_tick is not None and now >= next_tick:
                on_tick(t)
                next_tick += 0.5
            await asyncio.sleep(0.002)
        if tasks:
            await asyncio.gather(*tasks)
    result.elapsed_s = time.monotonic() - started
    for second, values in second_latencies.items():
        values.sort()
        result.p99_per_second[second] = values[min(int(len(values) * 0.99), len(values) - 1)]
    return result
