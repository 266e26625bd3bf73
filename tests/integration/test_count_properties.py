"""A property of every count, over random sequences of operator commands, against a
real PostgreSQL (and beanstalkd for dead letters): after each step, every rollup equals
a recount from the stored events plus the history of pruned months.

The steps are what happens to a deployment: batches stored (with duplicates, events
redelivered long after, out of order), scanner bursts split across batches, `forget`,
tombstones expiring, `prune`, `dead kick` of an entry the database still refuses, and
`rollups rebuild`. Each step runs the code the consumer and the commands run; the
recount is written here from the definitions in docs/ANALYTICS.md, not from the SQL.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import Phase
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from commands import deadletters, rollups
from consumer.classify import classifier
from consumer.writer import EventWriter
from store import forget, partitions
from store.sql import query
from tests.conftest import new_database
from tests.integration.test_pipeline import drain, rows
from tests.integration.test_rollups import (
    CHROME,
    GMAIL_PROXY,
    HOME,
    IPHONE,
    dimension,
    hour,
    stored_breakdown,
)
from tests.servers import Beanstalkd, Postgres
from trackbuf import codec
from trackbuf.events import Event, new_event

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
CAMPAIGNS = ("a", "b")
RECIPIENTS = ("r0", "r1", "r2", "r3")
LINKS = tuple(f"https://shop.example/{i}" for i in range(4))
# Moments events happen at: months ago (what prune drops) and recent, a few hours apart.
DAYS_AGO = (130, 100, 70, 40, 1, 0)
AGENTS = {"person": (IPHONE, HOME), "apple": ("Mozilla/5.0", "17.58.1.9"),
          "browser": (CHROME, HOME), "gmail": (GMAIL_PROXY, "66.249.84.1")}  # fmt: skip
WINDOW_S, MIN_LINKS = 2.0, 3  # consumer/data/machine_rules.json, timing.burst_clicks

Key = tuple[Any, ...]


def moment(days_ago: int, hours: int, seconds: float) -> datetime:
    return NOW - timedelta(days=days_ago) + timedelta(hours=hours, seconds=seconds)


events_st = st.builds(
    lambda kind, c, r, link, when, agent: (kind, c, r, link, when, agent),
    st.sampled_from(("open", "click")),
    st.sampled_from(CAMPAIGNS),
    st.sampled_from(RECIPIENTS),
    st.sampled_from(LINKS),
    st.tuples(st.sampled_from(DAYS_AGO), st.integers(0, 3), st.sampled_from((0, 0.5, 1.5, 9))),
    st.sampled_from(tuple(AGENTS)),
)


def make_event(spec: tuple[Any, ...]) -> Event:
    kind, campaign, recipient, link, (days, hours, secs), agent = spec
    ua, ip = AGENTS[agent]
    when = moment(days, hours, secs)
    return new_event(kind, campaign, recipient, url=link if kind == "click" else None,
                     user_agent=ua, ip=ip, now_ns=int(when.timestamp() * 1e9))  # fmt: skip


def job(events: list[Event]) -> bytes:
    return codec.encode_job([codec.encode_event(e) for e in events])


def scopes(e: Any) -> list[str]:
    return [""] + ([e["url"]] if e["kind"] == "click" and e["url"] else [])


def recount(
    stored: list[Any], carried: set[Key], human_carried: set[Key], history: dict[Key, Any]
) -> dict[Key, tuple[int, ...]]:
    """(campaign, kind, url, hour) -> (total, unique, human total, human unique, proxied
    total): the history of pruned hours, plus the stored events counted from the
    definitions."""
    counts: dict[Key, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for key, values in history.items():
        counts[key] = list(values)
    first: dict[Key, datetime] = {}
    first_human: dict[Key, datetime] = {}
    for e in stored:
        for url in scopes(e):
            counts[(e["campaign"], e["kind"], url, hour(e["occurred_at"]))][0] += 1
            who = (e["campaign"], e["kind"], url, e["recipient"])
            first[who] = min(first.get(who, e["occurred_at"]), e["occurred_at"])
            if not e["machine"]:
                counts[(e["campaign"], e["kind"], url, hour(e["occurred_at"]))][2] += 1
                if e["proxy"] is not None:
                    counts[(e["campaign"], e["kind"], url, hour(e["occurred_at"]))][4] += 1
                first_human[who] = min(first_human.get(who, e["occurred_at"]), e["occurred_at"])
    for who, at in first.items():
        if who not in carried:
            counts[(*who[:3], hour(at))][1] += 1
    for who, at in first_human.items():
        if who not in human_carried:
            counts[(*who[:3], hour(at))][3] += 1
    return {k: tuple(v) for k, v in counts.items() if any(v)}


def unmarked_bursts(stored: list[Any]) -> list[Any]:
    """People's direct clicks that the burst rule says are a scanner's."""
    clicks = [e for e in stored if e["kind"] == "click" and e["url"]]
    window = timedelta(seconds=WINDOW_S)
    return [
        e for e in clicks
        if not e["machine"] and e["proxy"] is None and len({n["url"] for n in clicks
            if (n["campaign"], n["recipient"]) == (e["campaign"], e["recipient"])
            and abs(n["occurred_at"] - e["occurred_at"]) <= window}) >= MIN_LINKS
    ]  # fmt: skip


def stored_rollups(dsn: str) -> dict[Key, tuple[int, ...]]:
    counts = {
        (r["campaign"], r["kind"], r["url"], r["hour"]): (
            r["total"], r["uniq"], r["human_total"], r["human_uniq"], r["proxied_total"])
        for r in rows(dsn, "SELECT * FROM rollups")
    }  # fmt: skip
    return {k: v for k, v in counts.items() if any(v)}


def test_no_sequence_of_commands_makes_a_count_drift(
    make_settings, beanstalkd: Beanstalkd, postgres: Postgres
) -> None:
    base = make_settings(threads=1)

    class Deployment(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.settings = replace(base, database_url=new_database(postgres))
            self.dsn = self.settings.database_url
            self.db = EventWriter(self.dsn)
            self.sent: list[Event] = []
            self.watermark = datetime.min.replace(tzinfo=UTC)
            # Scopes (campaign, kind, url, recipient) counted in a pruned month.
            self.carried: set[Key] = set()
            self.human_carried: set[Key] = set()
            self.history: dict[Key, Any] = {}
            self.history_breakdown: Counter[Key] = Counter()
            self.poison = 0

        def teardown(self) -> None:
            self.db.close()

        def store(self, events: list[Event]) -> None:
            self.db.insert_jobs([job(events)], len(events))
            self.sent += events

        @rule(specs=st.lists(events_st, min_size=1, max_size=6),
              again=st.lists(st.integers(0, 10_000), max_size=3))  # fmt: skip
        def insert(self, specs: list[Any], again: list[int]) -> None:
            """A batch: new events, some of them twice, and redeliveries of any sent."""
            fresh = [make_event(s) for s in specs]
            redelivered = [self.sent[i % len(self.sent)] for i in again if self.sent]
            self.store(fresh + fresh[:1] + redelivered)

        @rule(c=st.sampled_from(CAMPAIGNS), r=st.sampled_from(RECIPIENTS),
              days=st.sampled_from(DAYS_AGO), split=st.integers(1, 2),
              links=st.integers(3, 4))  # fmt: skip
        def scanner_burst(self, c: str, r: str, days: int, split: int, links: int) -> None:
            """A scanner follows every link within a second, in two batches."""
            clicks = [new_event("click", c, r, url=LINKS[i], user_agent=CHROME, ip=HOME,
                                now_ns=int(moment(days, 1, 0.2 * i).timestamp() * 1e9))
                      for i in range(links)]  # fmt: skip
            self.store(clicks[:split])
            self.store(clicks[split:])

        @rule(r=st.sampled_from(RECIPIENTS), c=st.none() | st.sampled_from(CAMPAIGNS))
        def forget(self, r: str, c: str | None) -> None:
            asyncio.run(forget.forget(self.dsn, r, c, 30))
            for carried in (self.carried, self.human_carried):
                carried -= {k for k in carried if k[3] == r and c in (None, k[0])}

        @rule()
        def tombstones_expire(self) -> None:
            rows(self.dsn, "UPDATE forgotten SET keep_until = now() - interval '1 second'")

        @rule(days=st.sampled_from((110, 80, 50, 20)))
        def prune(self, days: int) -> None:
            before = stored_rollups(self.dsn)  # equal to the recount: checked last step
            breakdown = stored_breakdown(self.dsn)
            stored = rows(self.dsn)
            pruned = asyncio.run(partitions.prune(self.dsn, timedelta(days=days)))
            cutoff = pruned.cutoff
            mark = cutoff.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            if mark <= self.watermark:
                return
            self.watermark = mark
            self.history = {k: v for k, v in before.items() if k[3] < mark}
            self.history_breakdown = Counter({k: v for k, v in breakdown.items() if k[4] < mark})
            kept = [e for e in stored if e["occurred_at"] >= mark]
            still = {(e["campaign"], e["kind"], u, e["recipient"]) for e in kept for u in scopes(e)}
            for e in stored:
                if e["occurred_at"] < mark:
                    for u in scopes(e):
                        who = (e["campaign"], e["kind"], u, e["recipient"])
                        self.carried.add(who)
                        if not e["machine"]:
                            self.human_carried.add(who)
            self.carried &= still
            self.human_carried &= still

        @rule()
        def dead_kick(self) -> None:
            """An event the database refuses is set aside; kicked back unfixed, it is set
            aside again, never lost, and counts nothing."""
            self.poison += 1
            bad = {"id": str(uuid.uuid4()), "k": "open", "t": NOW.isoformat(), "c": "a",
                   "r": f"poison-{self.poison}", "ua": None, "ip": "not-an-ip"}  # fmt: skip
            # Set aside as the consumer does (one drain less per step)...
            body = codec.encode_job([orjson.dumps(bad)])
            self.db.execute(query("insert_dead_letter"), "refused", None, body)
            # ...then kicked back into beanstalkd, and refused again by a real consumer.
            settings = self.settings
            assert asyncio.run(deadletters.kick(settings, [], everything=True)) == 0
            assert drain(settings) == 0
            assert len(rows(self.dsn, "SELECT 1 FROM dead_letters")) == self.poison

        @rule()
        def rebuild(self) -> None:
            asyncio.run(rollups.run(self.dsn, None, False, classifier()))

        @invariant()
        def every_rollup_equals_the_recount(self) -> None:
            stored = rows(self.dsn)
            assert all(e["occurred_at"] >= self.watermark for e in stored)
            assert unmarked_bursts(stored) == []
            want = recount(stored, self.carried, self.human_carried, self.history)
            assert stored_rollups(self.dsn) == want
            breakdown = Counter(self.history_breakdown)
            for e in stored:
                breakdown[(e["campaign"], e["kind"], *dimension(e), hour(e["occurred_at"]))] += 1
            assert +stored_breakdown(self.dsn) == +breakdown

    # Modest, to stay under a minute: every step is real database work (and a dead
    # kick two consumer drains). No shrinking: a step takes up to a second, and the
    # failing sequence as found (printed by hypothesis) is short enough to read.
    run_state_machine_as_test(
        Deployment,
        settings=hsettings(
            max_examples=14,
            stateful_step_count=10,
            phases=(Phase.explicit, Phase.reuse, Phase.generate),
        ),
    )
