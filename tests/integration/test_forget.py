"""`trackbuf forget` erases a person's rows and keeps their events on the way from
being stored: queued in beanstalkd, or spooled by an ingest, when it runs."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from store import forget
from tests.integration.test_pipeline import drain, hit_all, rows
from tests.procs import ROOT, env_for, start_ingest, trackbuf
from tests.servers import Beanstalkd
from trackbuf import codec, links
from trackbuf.events import new_event
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration

R = "erase-me@example.com"


def event_job(*people: tuple[str, str]) -> bytes:
    """One job with an open for each (campaign, recipient)."""
    return codec.encode_job([codec.encode_event(new_event("open", c, r)) for c, r in people])


def poison_job(campaign: str, recipient: str) -> bytes:
    """A job PostgreSQL refuses (the IP is not an address): it becomes a dead letter."""
    bad = replace(new_event("open", campaign, recipient), ip="not-an-ip")
    return codec.encode_job([codec.encode_event(bad)])


def stored(settings: Settings) -> Counter[tuple[str, str]]:
    return Counter(
        (r["recipient"], r["campaign"])
        for r in rows(settings.database_url, "SELECT recipient, campaign FROM events")
    )


def dead_bodies(settings: Settings) -> list[bytes]:
    return [bytes(r["body"]) for r in rows(settings.database_url, "SELECT body FROM dead_letters")]


def hit(settings: Settings, keyring: Keyring, people: list[tuple[str, str]]) -> None:
    """Opens through the real ingest, as a mail client makes them."""
    base = f"http://{settings.listen}"
    urls = [
        base + links.open_url(settings.public_url, keyring, c, r).removeprefix(settings.public_url)
        for c, r in people
    ]
    assert [status for status, _ in asyncio.run(hit_all(urls, concurrency=4))] == [200] * len(urls)


def spool_jobs(settings: Settings) -> float:
    with urllib.request.urlopen(f"http://{settings.admin_listen}/metrics", timeout=2) as response:
        text = response.read().decode()
    return sum(
        float(line.split()[-1]) for line in text.splitlines()
        if line.startswith("trackbuf_ingest_spool_jobs")
    )  # fmt: skip


def test_forget_erases_stored_queued_and_spooled_events_and_nobody_elses(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    settings = make_settings(threads=2)
    # Already stored: R in two campaigns, S; and a dead letter each for R and S.
    with beanstalkd.client() as client:
        client.put(event_job(("a", R), ("a", "s@example.com"), ("b", R)))
        client.put(event_job(("b", R), ("b", "s@example.com")))
        client.put(poison_job("a", R))
        client.put(poison_job("a", "s@example.com"))
    assert drain(settings) == 0
    assert stored(settings)[(R, "a")] == 1 and len(dead_bodies(settings)) == 2

    # On the way when forget runs, the consumer stopped: spooled by an ingest that
    # could not reach beanstalkd (then killed), and queued in beanstalkd, through a
    # real ingest and as jobs that mix R with others.
    beanstalkd.stop()
    spooling = start_ingest(settings, tmp_path / "ingest-1.log")
    hit(settings, keyring, [("a", R), ("c", R), ("a", "t@example.com")])
    spooling.kill()
    beanstalkd.start()
    assert beanstalkd.tube_stats()["current-jobs-ready"] == 0
    ingest = start_ingest(replace(settings, spool_dir=str(tmp_path / "other-spool")))
    hit(settings, keyring, [("a", R), ("a", "t@example.com"), ("b", "t@example.com")])
    assert ingest.terminate() == 0
    with beanstalkd.client() as client:
        client.put(event_job(("a", R), ("a", "s@example.com"), ("c", "u@example.com")))
        client.put(poison_job("b", R))
    # The ingest's three concurrent opens share one job or more (the job linger), and
    # the two jobs put by hand: at least three.
    assert beanstalkd.tube_stats()["current-jobs-ready"] >= 3

    done = trackbuf(settings, "forget", "--recipient", R)
    assert done.returncode == 0, done.stderr
    assert f"forget recipient {R!r}, all campaigns:" in done.stdout
    assert "  events        3 row(s) deleted" in done.stdout
    assert "  dead_letters  1 row(s) deleted" in done.stdout
    # first_events (who was first, for unique counts) names R once per campaign and kind.
    firsts = re.search(r"  first_events  (\d+) row\(s\) deleted", done.stdout)
    assert firsts is not None and int(firsts.group(1)) >= 1, done.stdout
    assert f"{4 + int(firsts.group(1))} row(s) deleted in all" in done.stdout
    assert "tombstone kept until" in done.stdout

    # The spool is replayed into beanstalkd by the next ingest, then everything drains.
    replaying = start_ingest(settings, tmp_path / "ingest-2.log")
    deadline = time.monotonic() + 20
    while spool_jobs(settings) > 0:
        assert time.monotonic() < deadline, "the spool was never replayed"
        time.sleep(0.1)
    assert replaying.terminate() == 0
    assert drain(settings) == 0
    assert beanstalkd.tube_stats()["current-jobs-ready"] == 0

    everyone = stored(settings)
    assert not [who for who in everyone if who[0] == R]
    assert everyone == Counter({
        ("s@example.com", "a"): 2, ("s@example.com", "b"): 1,
        ("t@example.com", "a"): 2, ("t@example.com", "b"): 1, ("u@example.com", "c"): 1,
    })  # fmt: skip
    left = rows(settings.database_url, "SELECT recipient FROM first_events")
    assert left and R not in {r["recipient"] for r in left}
    bodies = dead_bodies(settings)
    assert len(bodies) == 1 and b"s@example.com" in bodies[0]
    assert not any(R.encode() in body for body in bodies)

    again = trackbuf(settings, "forget", "--recipient", R)
    assert again.returncode == 0, again.stderr
    assert "  events        0 row(s) deleted" in again.stdout
    assert "  dead_letters  0 row(s) deleted" in again.stdout
    assert "nothing to delete" in again.stdout
    assert stored(settings) == everyone and len(dead_bodies(settings)) == 1


def test_forget_one_campaign_leaves_the_persons_other_campaigns(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    settings = make_settings()
    with beanstalkd.client() as client:
        client.put(event_job(("a", R), ("b", R), ("a", "s@example.com")))
        client.put(poison_job("a", R))
        client.put(poison_job("b", R))
    assert drain(settings) == 0
    with beanstalkd.client() as client:
        client.put(event_job(("a", R), ("b", R), ("a", "s@example.com")))
        client.put(poison_job("a", R))

    done = trackbuf(settings, "forget", "--recipient", R, "--campaign", "a")
    assert done.returncode == 0, done.stderr
    assert f"forget recipient {R!r}, campaign 'a':" in done.stdout
    assert "  events        1 row(s) deleted" in done.stdout
    assert "  dead_letters  1 row(s) deleted" in done.stdout
    assert drain(settings) == 0

    assert stored(settings) == Counter({(R, "b"): 2, ("s@example.com", "a"): 2})
    bodies = dead_bodies(settings)
    assert len(bodies) == 1 and b'"c":"b"' in bodies[0]

    again = trackbuf(settings, "forget", "--recipient", R, "--campaign", "a")
    assert again.returncode == 0 and "nothing to delete" in again.stdout


def test_events_arriving_after_the_tombstone_expired_are_stored_again(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    settings = make_settings()
    assert trackbuf(settings, "forget", "--recipient", R).returncode == 0
    with beanstalkd.client() as client:
        client.put(event_job(("a", R)))
    assert drain(settings) == 0
    assert stored(settings) == Counter()  # the tombstone drops new events too
    # Its keep date passes: the consumer deletes it, and R's new events are new data.
    rows(settings.database_url, "UPDATE forgotten SET keep_until = now() - interval '1 s'")
    with beanstalkd.client() as client:
        client.put(event_job(("a", R)))
    assert drain(settings) == 0
    assert stored(settings) == Counter({(R, "a"): 1})
    assert rows(settings.database_url, "SELECT * FROM forgotten") == []


def test_forget_waits_for_an_insert_that_started_before_the_tombstone(
    make_settings,
) -> None:
    """A consumer insert already running when the tombstone is committed cannot see it;
    forget must not delete before that insert commits, or its rows for R would stay."""
    settings = make_settings()

    async def scenario() -> tuple[subprocess.CompletedProcess[str], float]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO events (event_id, kind, occurred_at, campaign, recipient) "
                    "VALUES (gen_random_uuid(), 'open', now(), 'a', $1)",
                    R,
                )
                started = time.monotonic()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "commands", "forget", "--recipient", R,
                    env=env_for(settings), cwd=ROOT,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                await asyncio.sleep(1.5)  # forget has committed its tombstone and waits
                assert proc.returncode is None
            out, err = await proc.communicate()  # the insert has committed
            waited = time.monotonic() - started
        finally:
            await conn.close()
        assert proc.returncode is not None
        return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode()), waited

    done, waited = asyncio.run(scenario())
    assert done.returncode == 0, done.stderr
    assert waited >= 1.5
    assert "  events        1 row(s) deleted" in done.stdout
    assert stored(settings) == Counter()


def test_forget_gives_up_on_a_transaction_left_open_and_a_second_run_finishes(
    make_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings()
    monkeypatch.setattr(forget, "LOCK_TIMEOUT", "300ms")

    async def scenario() -> str:
        conn = await asyncpg.connect(settings.database_url)
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO events (event_id, kind, occurred_at, campaign, recipient) "
                    "VALUES (gen_random_uuid(), 'open', now(), 'a', $1)",
                    R,
                )
                with pytest.raises(forget.ForgetError) as failed:
                    await forget.forget(settings.database_url, R, None, 30)
        finally:
            await conn.close()
        return str(failed.value)

    message = asyncio.run(scenario())
    assert "tombstone is in place" in message and "run the same command again" in message
    assert len(rows(settings.database_url, "SELECT * FROM forgotten")) == 1
    done = trackbuf(settings, "forget", "--recipient", R)
    assert done.returncode == 0 and "  events        1 row(s) deleted" in done.stdout
    assert stored(settings) == Counter()


@pytest.mark.parametrize(
    ("body", "campaign", "matches"),
    [
        (b'{"v":1,"n":2,"e":[{"r":"x@example.com","c":"a"},{"r":"R","c":"a"}]}', None, True),
        (b'{"v":1,"n":1,"e":[{"r":"R","c":"a"}]}', "b", False),
        (b'{"r":"R","c":"a","id":"not-a-uuid"}', "a", True),  # one event set aside
        (b'{"r":"\\u0052","c":"a"}', "a", True),  # escaped in the JSON
        (b'{"r":"RR","u":"R"}', None, False),  # another recipient, R elsewhere
        (b'\x00garbage "R" "a"', "a", True),  # not JSON: the bytes are searched
        (b'\xff{"r":"R"}', "b", False),
        (b'{"v":1,"n":1,"e":[{"r":"R"', None, True),  # cut short
    ],
)
def test_dead_letter_bodies_are_matched_by_recipient(
    database_url: str, body: bytes, campaign: str | None, matches: bool
) -> None:
    async def check() -> bool:
        conn = await asyncpg.connect(database_url)
        try:
            found: bool = await conn.fetchval(
                "SELECT trackbuf_body_mentions($1, $2, $3)", body, "R", campaign
            )
            return found
        finally:
            await conn.close()

    assert asyncio.run(check()) is matches
