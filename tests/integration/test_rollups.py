"""Rollups against a real consumer and PostgreSQL: every count equals one computed here
from the raw rows, and replaying every event leaves every count as it was."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.integration.test_pipeline import drain, rows
from tests.servers import Beanstalkd, Postgres
from trackbuf import codec
from trackbuf.events import Event, new_event

pytestmark = pytest.mark.integration

START = datetime(2026, 11, 28, 21, 30, tzinfo=UTC)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)"
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
HOME = "198.51.100.23"
LINKS = [f"https://shop.example/{name}" for name in ("sale", "new", "shoes", "unsubscribe")]


def at(seconds: float, kind: str, campaign: str, recipient: str, **extra: Any) -> Event:
    moment = START + timedelta(seconds=seconds)
    return new_event(kind, campaign, recipient, now_ns=int(moment.timestamp() * 1e9), **extra)


def campaign_traffic(rng: random.Random, campaign: str, people: int) -> list[Event]:
    """A day and a half of one campaign: proxies and Apple's prefetch open first, people
    open and click later (some more than once), scanners click every link at once."""
    events: list[Event] = []
    for n in range(people):
        who = f"{campaign}-r{n}"
        t = rng.uniform(0, 600)
        if n % 4 == 0:  # Apple Mail Privacy Protection fetches at delivery...
            events.append(at(t, "open", campaign, who, user_agent="Mozilla/5.0", ip="17.58.1.9"))
        if n % 4 == 1:  # ...Gmail's proxy when the message is first shown.
            events.append(at(t + 60, "open", campaign, who, user_agent=GMAIL_PROXY))
        if n % 5 == 0:  # a security gateway follows every link within a second
            for i, link in enumerate(LINKS):
                events.append(at(t + 1 + i * 0.2, "click", campaign, who, url=link,
                                 user_agent=CHROME, ip=HOME))  # fmt: skip
            continue
        for _ in range(rng.choice((0, 1, 1, 2, 3))):  # people read, some several times
            t += rng.uniform(600, 40_000)
            agent = rng.choice((IPHONE, OUTLOOK, CHROME))
            events.append(at(t, "open", campaign, who, user_agent=agent, ip=HOME))
            if rng.random() < 0.5:
                link = rng.choice(LINKS[:3])
                events.append(
                    at(t + 5, "click", campaign, who, url=link, user_agent=CHROME, ip=HOME)
                )
                if rng.random() < 0.3:  # two links a few seconds apart: still a person
                    other = rng.choice([x for x in LINKS[:3] if x != link])
                    events.append(at(t + 9, "click", campaign, who, url=other, user_agent=CHROME,
                                     ip=HOME))  # fmt: skip
    return events


def jobs_of(events: list[Event], rng: random.Random) -> list[bytes]:
    jobs, at_ = [], 0
    while at_ < len(events):
        size = rng.randint(1, 30)
        jobs.append(codec.encode_job([codec.encode_event(e) for e in events[at_ : at_ + size]]))
        at_ += size
    return jobs


def put(beanstalkd: Beanstalkd, jobs: list[bytes]) -> None:
    with beanstalkd.client() as client:
        for body in jobs:
            client.put(body)


def hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def expected_rollups(events: list[Any]) -> dict[tuple[Any, ...], tuple[int, int, int, int]]:
    """(campaign, kind, url or '', hour) -> (total, unique, human total, human unique),
    from raw rows: a recipient is unique in the hour of their first event (per campaign,
    or per link for clicks), a human unique in the hour of their first human event."""
    counts: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    first: dict[tuple[Any, ...], datetime] = {}
    first_human: dict[tuple[Any, ...], datetime] = {}
    for e in sorted(events, key=lambda e: e["occurred_at"]):
        scopes = [""] + ([e["url"]] if e["kind"] == "click" else [])
        for url in scopes:
            key = (e["campaign"], e["kind"], url, hour(e["occurred_at"]))
            who = (e["campaign"], e["kind"], url, e["recipient"])
            counts[key][0] += 1
            counts[key][2] += 0 if e["machine"] else 1
            first.setdefault(who, e["occurred_at"])
            if not e["machine"]:
                first_human.setdefault(who, e["occurred_at"])
    for (campaign, kind, url, _), moment in first.items():
        counts[(campaign, kind, url, hour(moment))][1] += 1
    for (campaign, kind, url, _), moment in first_human.items():
        counts[(campaign, kind, url, hour(moment))][3] += 1
    return {key: (a, b, c, d) for key, (a, b, c, d) in counts.items()}


def stored_rollups(dsn: str) -> dict[tuple[Any, ...], tuple[int, int, int, int]]:
    return {
        (r["campaign"], r["kind"], r["url"], r["hour"]): (
            r["total"], r["uniq"], r["human_total"], r["human_uniq"])
        for r in rows(dsn, "SELECT * FROM rollups")
    }  # fmt: skip


def dimension(e: Any) -> tuple[str, str]:
    """Machines by reason, people through a proxy by proxy, other people by client."""
    if e["machine"]:
        return "reason", e["machine_reason"]
    if e["proxy"] is not None:
        return "proxy", e["proxy"]
    return "client", e["client"]


def expected_breakdown(events: list[Any]) -> Counter[tuple[Any, ...]]:
    return Counter(
        (e["campaign"], e["kind"], *dimension(e), hour(e["occurred_at"])) for e in events
    )


def stored_breakdown(dsn: str) -> Counter[tuple[Any, ...]]:
    return Counter({
        (r["campaign"], r["kind"], r["dimension"], r["value"], r["hour"]): r["total"]
        for r in rows(dsn, "SELECT * FROM rollup_breakdown")
    })  # fmt: skip


def test_rollups_equal_counts_from_raw_rows_and_replays_change_nothing(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    rng = random.Random(13)
    events = [e for c in ("spring", "summer") for e in campaign_traffic(rng, c, 60)]
    events.sort(key=lambda e: e.occurred_at)
    settings = make_settings(threads=1)
    # Delivery-time fetches (proxies, scanners) are stored before people read: a person's
    # first open then makes a human unique of a recipient already counted as unique.
    cut = START + timedelta(minutes=20)
    put(beanstalkd, jobs_of([e for e in events if e.occurred_at < cut], rng))
    assert drain(settings) == 0
    put(beanstalkd, jobs_of([e for e in events if e.occurred_at >= cut], rng))
    assert drain(settings) == 0
    dsn = settings.database_url
    stored = rows(dsn)
    assert len(stored) == len(events)
    # Nothing dropped, every event classified, and the kinds of traffic told apart.
    reasons = Counter(r["machine_reason"] for r in stored)
    # Gmail's proxy fetches when a person displays the message: a person, proxied.
    assert reasons["apple_mpp"] == 2 * 15 and reasons["google_image_proxy"] == 0
    assert Counter(r["proxy"] for r in stored)["google_image_proxy"] == 2 * 15
    assert all(not r["machine"] for r in stored if r["proxy"])
    assert reasons["burst_clicks"] == 2 * 12 * len(LINKS)
    assert all(r["machine"] is (r["machine_reason"] is not None) for r in stored)
    assert {r["client"] for r in stored if not r["machine"] and not r["proxy"]} == {
        "Mobile Safari UI/WKWebView", "Outlook", "Chrome"}  # fmt: skip
    assert reasons[None] > 100

    want = expected_rollups(stored)
    assert stored_rollups(dsn) == want
    assert stored_breakdown(dsn) == expected_breakdown(stored)

    # Every job again, twice, regrouped and shuffled, drained by four threads at once.
    replay = jobs_of(events, rng) + jobs_of(list(reversed(events)), rng)
    rng.shuffle(replay)
    put(beanstalkd, replay)
    assert drain(make_settings(threads=4, batch_size=50)) == 0
    assert len(rows(dsn)) == len(events)
    assert stored_rollups(dsn) == want
    assert stored_breakdown(dsn) == expected_breakdown(stored)


def test_concurrent_out_of_order_drains_count_each_recipient_once(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    rng = random.Random(7)
    events = [e for c in ("a", "b", "c") for e in campaign_traffic(rng, c, 80)]
    rng.shuffle(events)  # redeliveries after an outage arrive in any order
    put(beanstalkd, jobs_of(events, rng))
    settings = make_settings(threads=4, batch_size=40)
    assert drain(settings) == 0
    stored = rows(settings.database_url)
    assert len(stored) == len(events)
    # Whatever order they were stored in, a recipient's unique is in the hour of their
    # earliest event, and bursts split between threads are found whole.
    assert stored_rollups(settings.database_url) == expected_rollups(stored)
    assert stored_breakdown(settings.database_url) == expected_breakdown(stored)


def test_a_burst_of_clicks_is_a_machine_and_a_persons_clicks_are_not(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    settings = make_settings(threads=1)
    scanner = [at(i * 0.3, "click", "x", "scanned", url=link, user_agent=CHROME, ip=HOME)
               for i, link in enumerate(LINKS)]  # fmt: skip
    person = [
        at(100, "click", "x", "reader", url=LINKS[0], user_agent=CHROME, ip=HOME),
        at(104, "click", "x", "reader", url=LINKS[1], user_agent=CHROME, ip=HOME),
        at(900, "click", "x", "reader", url=LINKS[2], user_agent=CHROME, ip=HOME),
        at(901, "click", "x", "reader", url=LINKS[2], user_agent=CHROME, ip=HOME),
    ]
    # The scanner's last click comes in a later job than its first ones: still a burst,
    # found against the first clicks already stored.
    put(beanstalkd, [codec.encode_job([codec.encode_event(e) for e in scanner[:3]])])
    assert drain(settings) == 0
    put(beanstalkd, [codec.encode_job([codec.encode_event(e) for e in [scanner[3], *person]])])
    assert drain(settings) == 0
    verdicts = {
        (r["recipient"], r["url"], r["occurred_at"]): r["machine_reason"]
        for r in rows(settings.database_url)
    }
    assert [verdicts[(e.recipient, e.url, e.occurred_at)] for e in scanner] == ["burst_clicks"] * 4
    assert [verdicts[(e.recipient, e.url, e.occurred_at)] for e in person] == [None] * 4


def test_rebuild_classifies_old_rows_and_recounts_from_raw_events(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    from tests.procs import trackbuf

    rng = random.Random(5)
    events = sorted(campaign_traffic(rng, "old", 40), key=lambda e: e.occurred_at)
    settings = make_settings(threads=1)
    put(beanstalkd, jobs_of(events, rng))
    assert drain(settings) == 0
    dsn = settings.database_url
    classified = {
        r["event_id"]: (r["machine"], r["machine_reason"], r["client"]) for r in rows(dsn)
    }
    # As if stored before classification existed: no verdicts, no rollups.
    rows(dsn, "UPDATE events SET machine = NULL, machine_reason = NULL, client = NULL")
    for table in ("rollups", "first_events", "rollup_breakdown"):
        rows(dsn, f"DELETE FROM {table}")
    done = trackbuf(settings, "rollups", "rebuild")
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip() == f"campaign old: rollups rebuilt, {len(events)} event(s) classified"
    )
    stored = rows(dsn)
    assert {r["event_id"]: (r["machine"], r["machine_reason"], r["client"]) for r in stored} == (
        classified
    )
    assert stored_rollups(dsn) == expected_rollups(stored)
    assert stored_breakdown(dsn) == expected_breakdown(stored)
    # And the consumer goes on counting on top of the rebuilt rollups.
    later = [
        at(90_000 + i, "open", "old", f"old-r{i}", user_agent=IPHONE, ip=HOME) for i in range(5)
    ]
    put(beanstalkd, jobs_of(later, rng))
    assert drain(settings) == 0
    stored = rows(dsn)
    assert stored_rollups(dsn) == expected_rollups(stored)


def test_a_burst_split_between_two_threads_is_found_whole_and_rebuild_agrees(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    from tests.procs import trackbuf

    clicks = [at(i * 0.3, "click", "x", "scanned", url=link, user_agent=CHROME, ip=HOME)
              for i, link in enumerate(LINKS)]  # fmt: skip
    # Two halves written by two threads at once: the batches lock their clickers, so the
    # second insert sees the first's two links and marks all four.
    put(beanstalkd, [codec.encode_job([codec.encode_event(e) for e in half])
                     for half in (clicks[:2], clicks[2:])])  # fmt: skip
    settings = make_settings(threads=2, batch_size=2)
    assert drain(settings) == 0
    stored = rows(settings.database_url)
    assert [r["machine_reason"] for r in stored] == ["burst_clicks"] * 4
    live = stored_rollups(settings.database_url)
    assert live == expected_rollups(stored)
    done = trackbuf(settings, "rollups", "rebuild", "--campaign", "x")
    assert done.returncode == 0, done.stderr
    assert stored_rollups(settings.database_url) == live


def test_a_click_on_a_url_too_long_for_an_index_is_stored_and_counted(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    import secrets

    long_url = "https://shop.example/?q=" + secrets.token_urlsafe(4500)  # > a B-tree entry
    settings = make_settings(threads=1)
    clicks = [at(i * 60, "click", "x", f"r{i % 2}", url=long_url, user_agent=CHROME, ip=HOME)
              for i in range(3)]  # fmt: skip
    put(beanstalkd, [codec.encode_job([codec.encode_event(e) for e in clicks])])
    assert drain(settings) == 0
    stored = rows(settings.database_url)
    assert len(stored) == 3
    assert rows(settings.database_url, "SELECT * FROM dead_letters") == []
    assert stored_rollups(settings.database_url) == expected_rollups(stored)
    ((_, _, url, _),) = [k for k in stored_rollups(settings.database_url) if k[2]]
    assert url == long_url


V10_RECOUNT = """
INSERT INTO first_events (campaign, recipient, kind, url, first_at, first_human_at)
SELECT campaign, recipient, kind, s.url, min(occurred_at),
       min(occurred_at) FILTER (WHERE NOT machine)
FROM events CROSS JOIN LATERAL (VALUES (''), (CASE WHEN kind = 'click' THEN url END)) s(url)
WHERE s.url IS NOT NULL GROUP BY 1, 2, 3, 4;
INSERT INTO rollups (campaign, kind, url, hour, total, uniq, human_total, human_uniq)
SELECT campaign, kind, url, hour, sum(t), sum(u), sum(h), sum(hu) FROM (
    SELECT campaign, kind, s.url, date_trunc('hour', occurred_at, 'UTC') AS hour,
           1 AS t, 0 AS u, (NOT machine)::int AS h, 0 AS hu
    FROM events CROSS JOIN LATERAL (VALUES (''), (CASE WHEN kind = 'click' THEN url END)) s(url)
    WHERE s.url IS NOT NULL
    UNION ALL SELECT campaign, kind, url, date_trunc('hour', first_at, 'UTC'), 0, 1, 0, 0
    FROM first_events
    UNION ALL SELECT campaign, kind, url, date_trunc('hour', first_human_at, 'UTC'), 0, 0, 0, 1
    FROM first_events WHERE first_human_at IS NOT NULL) d
GROUP BY 1, 2, 3, 4;
INSERT INTO rollup_breakdown (campaign, kind, dimension, value, hour, total)
SELECT campaign, kind, CASE WHEN machine THEN 'reason' ELSE 'client' END,
       CASE WHEN machine THEN machine_reason ELSE client END,
       date_trunc('hour', occurred_at, 'UTC'), count(*)
FROM events GROUP BY 1, 2, 3, 4, 5;
"""


def test_migration_0011_makes_stored_gmail_and_yahoo_opens_proxied_people(
    postgres: Postgres,
) -> None:
    """Rows stored when webmail proxies were machines become proxied people, and the
    counts follow exactly: the migration leaves what a rebuild would make."""
    import asyncio

    import asyncpg

    from commands import rollups
    from consumer.classify import classifier
    from store.migrate import migrate
    from tests.conftest import new_database

    dsn = new_database(postgres)
    yahoo = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
    # (recipient, kind, seconds, agent, machine reason as release 0010 stored it, client)
    stored = [
        ("r1", "open", 0, GMAIL_PROXY, "google_image_proxy", "GmailImageProxy"),
        ("r1", "open", 7200, IPHONE, None, "Mobile Safari UI/WKWebView"),
        ("r2", "open", 3600, GMAIL_PROXY, "google_image_proxy", "GmailImageProxy"),
        ("r3", "open", 0, "Mozilla/5.0", "apple_mpp", "Other"),
        ("r4", "open", 3 * 3600, yahoo, "yahoo_proxy", "YahooMailProxy"),
        ("r4", "click", 4 * 3600, CHROME, None, "Chrome"),
    ]

    async def as_release_0010_left_it() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
            assert 11 not in await migrate(conn, up_to=10)
            for who, kind, secs, agent, reason, client in stored:
                await conn.execute(
                    "INSERT INTO events (event_id, kind, occurred_at, campaign, recipient, url,"
                    " user_agent, machine, machine_reason, client)"
                    " VALUES (gen_random_uuid(), $1, $2, 'm', $3, $4, $5, $6, $7, $8)",
                    kind, START + timedelta(seconds=secs), who,
                    LINKS[0] if kind == "click" else None, agent, reason is not None, reason,
                    client,
                )  # fmt: skip
            await conn.execute(V10_RECOUNT)
            assert await migrate(conn) == [11]
        finally:
            await conn.close()

    asyncio.run(as_release_0010_left_it())
    events = rows(dsn)
    assert sorted((e["recipient"], e["proxy"] or "-") for e in events if not e["machine"]) == [
        ("r1", "-"), ("r1", "google_image_proxy"), ("r2", "google_image_proxy"),
        ("r4", "-"), ("r4", "yahoo_proxy")]  # fmt: skip
    assert [e["machine_reason"] for e in events if e["machine"]] == ["apple_mpp"]
    migrated = stored_rollups(dsn)
    assert migrated == expected_rollups(events)
    assert stored_breakdown(dsn) == expected_breakdown(events)
    proxied = rows(dsn, "SELECT sum(proxied_total) AS n FROM rollups WHERE url = ''")
    assert proxied[0]["n"] == 3
    asyncio.run(rollups.run(dsn, None, False, classifier()))
    assert stored_rollups(dsn) == migrated
    assert +stored_breakdown(dsn) == +expected_breakdown(events)
    rebuilt = rows(dsn, "SELECT sum(proxied_total) AS n FROM rollups WHERE url = ''")
    assert rebuilt[0]["n"] == 3
