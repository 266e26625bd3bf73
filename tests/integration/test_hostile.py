"""Hostile traffic through a real ``trackbuf ingest`` and a real beanstalkd.

Over a thousand raw requests from a seeded generator (``tests/hostile.py``; set
``TRACKBUF_HOSTILE_SEED`` to replay one run): odd and unknown methods, huge and many
headers, bytes that are not UTF-8, overlong paths, percent-encoding tricks, CRLF
injection and request smuggling, truncated, forged, wrong-kind and respelt tokens,
tokens signed with a real key over payloads trackbuf refuses, pipelining, junk that
is not HTTP, and a few clients sending a byte a second, in parallel. Valid opens and
clicks are mixed in as controls.

Marked ``integration``, not ``faults``: nothing is killed or restarted, it takes about
half a minute (the slow clients set the pace), and a change that makes ingest answer
5xx or redirect where it must not should fail the ordinary run, not only the fault
suite.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import hypothesis
import pytest
import schemathesis

from tests.conftest import KEYS
from tests.hostile import CAMPAIGN, Generator, Probe, ProbeResult, exchange, request, slow_client
from tests.procs import LIVE, start_ingest
from tests.servers import Beanstalkd, free_port, rss_bytes, take_recipients
from trackbuf import links
from trackbuf.log import parse
from trackbuf.settings import Settings, load
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration

HOSTILE_COUNT = 1200
WARMUP_COUNT = 400
CONCURRENCY = 16
SEED = int(os.environ.get("TRACKBUF_HOSTILE_SEED", random.SystemRandom().randrange(10**9)))
SECRETS = {kid: secret.encode() for kid, _, secret in (k.partition(":") for k in KEYS.split(","))}


async def run_all(host: str, port: int, probes: list[Probe]) -> list[ProbeResult]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(probe: Probe) -> ProbeResult:
        async with gate:
            return await exchange(host, port, probe)

    return list(await asyncio.gather(*(one(p) for p in probes)))


def check(outcomes: list[ProbeResult], targets: set[str]) -> list[str]:
    """What must never happen, as readable lines (empty when all is well)."""
    problems = []
    for outcome in outcomes:
        probe = outcome.probe
        for answer in outcome.answers:
            if answer.status >= 500:
                problems.append(f"{probe.kind}: {answer.status} for {probe.raw[:120]!r}")
            for location in answer.header("location"):
                if location not in targets:
                    problems.append(f"{probe.kind}: redirect to {location!r}: {probe.raw[:120]!r}")
            if 300 <= answer.status < 400 and not answer.header("location"):
                problems.append(f"{probe.kind}: {answer.status} without Location")
        if probe.records is not None:  # a valid control: answered right, at once
            expected = 302 if probe.location else 200
            got = [(a.status, a.header("location")) for a in outcome.answers]
            want = [(expected, [probe.location] if probe.location else [])]
            if got != want:
                problems.append(f"{probe.kind}: {got} ({outcome.error}), want {want}")
    return problems


def test_hostile_requests_never_5xx_never_redirect_never_enqueue(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    settings: Settings = make_settings()
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    host, port_text = settings.listen.rsplit(":", 1)
    port = int(port_text)
    pid = ingest.proc.pid
    print(f"hostile seed {SEED} (TRACKBUF_HOSTILE_SEED={SEED} replays it)")

    # Warm-up: the same mix, so the allocator and aiohttp's buffers reach their working
    # size before memory is measured.
    warm = Generator(SEED ^ 0x5EED, keyring, SECRETS, "warm")
    outcomes = asyncio.run(run_all(host, port, warm.batch(WARMUP_COUNT)))
    assert check(outcomes, warm.targets) == []
    time.sleep(1.0)
    rss_warm = rss_bytes(pid)

    gen = Generator(SEED, keyring, SECRETS, "run")
    probes = gen.batch(HOSTILE_COUNT)

    async def hostile_run() -> tuple[list[ProbeResult], list[ProbeResult]]:
        slow = [
            # Complete tiny requests, a byte a second: answered once they arrive.
            slow_client(host, port, b"GET /o/ HTTP/1.0\r\n\r\n", seconds=25),
            slow_client(host, port, b"HEAD /c/x HTTP/1.0\r\n\r\n", seconds=25),
            # Requests that never end, dripped for 15 s and then abandoned.
            slow_client(host, port, request("GET", "/o/x.gif", [b"X-A: " + b"a" * 100]), 15),
            slow_client(host, port, b"GET /c/" + b"A" * 200, seconds=15),
        ]
        slow_tasks = [asyncio.ensure_future(s) for s in slow]
        await asyncio.sleep(1.5)  # the slow ones are connected and dripping
        fast = await run_all(host, port, probes)
        return fast, list(await asyncio.gather(*slow_tasks))

    started = time.monotonic()
    outcomes, slow_outcomes = asyncio.run(hostile_run())
    elapsed = time.monotonic() - started
    time.sleep(2.0)  # settle
    rss_after = rss_bytes(pid)

    # A valid request is still answered correctly after all that.
    target = "https://shop.example/after"
    gen.targets.add(target)
    after_open = links.open_url(f"http://{settings.listen}", keyring, CAMPAIGN, "after-open")
    after_click = links.click_url(f"http://{settings.listen}", keyring, CAMPAIGN,
                                  "after-click", target)  # fmt: skip

    async def after() -> list[tuple[int, str | None]]:
        async with aiohttp.ClientSession() as session:
            out = []
            for url in (after_open, after_click):
                async with session.get(url, allow_redirects=False) as response:
                    await response.read()
                    out.append((response.status, response.headers.get("Location")))
            return out

    assert asyncio.run(after()) == [(200, None), (302, target)]
    queued = Counter(take_recipients(beanstalkd))
    assert ingest.terminate() == 0

    answered = sum(len(o.answers) for o in outcomes)
    kinds = Counter(p.kind for p in probes)
    print(f"{len(probes)} probes in {elapsed:.1f} s, {answered} answers; {dict(kinds)}")
    print("statuses", Counter(a.status for o in outcomes for a in o.answers))
    print(f"RSS warm {rss_warm / 2**20:.1f} MB, after {rss_after / 2**20:.1f} MB")
    assert len(probes) >= 1000
    assert check(outcomes + slow_outcomes, gen.targets) == []
    # Exactly the valid controls became events, once each: no hostile request was
    # enqueued, none of the controls was lost or doubled.
    expected = Counter(warm.valid + gen.valid + ["after-open", "after-click"])
    assert queued == expected, (queued - expected, expected - queued)
    # The slow clients that finished were answered; the abandoned ones cost nothing.
    slow_statuses = [[a.status for a in o.answers] for o in slow_outcomes]
    assert slow_statuses[:2] == [[200], [404]], [
        (s, o.error) for s, o in zip(slow_statuses, slow_outcomes, strict=True)
    ]
    assert rss_after <= rss_warm * 1.10, (rss_warm, rss_after)
    # Nothing failed inside ingest: no handler error, no traceback.
    for line in ingest.log().splitlines():
        fields = parse(line)
        assert fields["level"] in ("INFO", "WARNING") or fields["event"] == "bad_request", line
        assert "exc" not in fields, line


FLOOD = 3000


def test_a_flood_of_invalid_tokens_never_reaches_beanstalkd(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    """Forged, garbled and wrong-kind tokens are refused before anything is queued:
    beanstalkd's ``cmd-put`` and the tube's ``total-jobs`` do not move during the flood
    (and do move for the one valid request after it, so the measure is live)."""
    settings: Settings = make_settings()
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    base = f"http://{settings.listen}"
    forger = Keyring.parse("k2:an-attacker-guessed-this-key-0123")
    rng = random.Random(SEED)
    valid_open = links.open_url(base, keyring, "flood", "real")
    invalid = []
    for i in range(FLOOD):
        shape = i % 4
        if shape == 0:
            invalid.append(links.open_url(base, forger, "flood", f"f{i}"))
        elif shape == 1:
            invalid.append(links.click_url(base, forger, "flood", f"f{i}", "https://evil.example/"))
        elif shape == 2:  # a valid open token on the click route
            invalid.append(valid_open.replace("/o/", "/c/").removesuffix(".gif"))
        else:
            junk = "".join(rng.choice("ABCDEFabcdef0123456789-_.") for _ in range(60))
            invalid.append(f"{base}/{rng.choice('oc')}/{junk}")

    async def hit(urls: list[str]) -> Counter[int]:
        statuses: Counter[int] = Counter()
        gate = asyncio.Semaphore(32)
        async with aiohttp.ClientSession() as session:

            async def one(url: str) -> None:
                async with gate, session.get(url, allow_redirects=False) as response:
                    await response.read()
                    statuses[response.status] += 1

            await asyncio.gather(*(one(url) for url in urls))
        return statuses

    def puts() -> tuple[int, int]:
        return beanstalkd.stats()["cmd-put"], beanstalkd.tube_stats()["total-jobs"]

    try:
        assert asyncio.run(hit([links.open_url(base, keyring, "flood", "first")])) == {200: 1}
        before = puts()
        assert before[0] >= 1
        statuses = asyncio.run(hit(invalid))
        during = puts()
        assert asyncio.run(hit([valid_open])) == {200: 1}
        after = puts()
    finally:
        assert ingest.terminate() == 0
    pixels = sum("/o/" in url for url in invalid)  # a pixel is served whatever the token
    assert statuses == {200: pixels, 404: FLOOD - pixels}, statuses
    assert during == before  # the flood put nothing
    assert after == (before[0] + 1, before[1] + 1)


# schemathesis: the public endpoints fuzzed from docs/openapi.yaml ---------------------

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
schema = schemathesis.openapi.from_path(OPENAPI)


@dataclass
class FuzzTarget:
    base_url: str
    queue: Beanstalkd


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    """One ingest and beanstalkd for every operation schemathesis fuzzes (module-scoped:
    hypothesis runs many examples per test, and a server per example would dominate)."""
    work = tmp_path_factory.mktemp("fuzz")
    queue = Beanstalkd(work / "binlog").start()
    settings = load({}, overrides={"beanstalkd": queue.address, "signing_keys": KEYS,
                                   "listen": f"127.0.0.1:{free_port()}",
                                   "admin_listen": f"127.0.0.1:{free_port()}",
                                   "spool_dir": str(work / "spool")})  # fmt: skip
    try:
        # Inside the try: an ingest that fails to start must not leave beanstalkd
        # running (its Popen, collected later, fails whichever test is running then).
        ingest = start_ingest(settings, work / "ingest.log")
        LIVE.remove(ingest)  # outlives the per-test clean-up; stopped below
        try:
            yield FuzzTarget(f"http://{settings.listen}", queue)
        finally:
            ingest.kill()
    finally:
        queue.kill()


def no_redirect_without_a_signed_token(
    ctx: object, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """schemathesis never holds a valid token, so no answer may redirect."""
    if 300 <= response.status_code < 400 or "Location" in response.headers:
        raise AssertionError(f"redirect to {response.headers.get('Location')!r}")
    return None


@schema.parametrize()
@hypothesis.settings(max_examples=60, deadline=None)
def test_openapi_fuzzing_of_the_public_endpoints(
    case: schemathesis.Case, fuzz_target: FuzzTarget
) -> None:
    """schemathesis (with hypothesis) generates requests for every operation in
    docs/openapi.yaml and checks each answer against it: no 5xx, only the statuses,
    content types and headers the file declares, and no redirect. It goes through
    ``requests``, which normalises what it sends, so it complements the raw-socket
    suite above rather than replacing it; no request it makes may put an event."""
    case.call_and_validate(base_url=fuzz_target.base_url,
                           additional_checks=[no_redirect_without_a_signed_token])  # fmt: skip
    assert fuzz_target.queue.stats()["cmd-put"] == 0
