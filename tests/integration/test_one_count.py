"""One definition of every count, against a real consumer and PostgreSQL: what the
insert counts is what `rollups rebuild` recounts, and no operator command (prune,
forget, rebuild, a redelivery) makes a count drift. One test per finding of the review
that asked for it (numbers in the test names)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.integration.test_pipeline import drain, rows
from tests.integration.test_rollups import (
    CHROME,
    HOME,
    IPHONE,
    LINKS,
    at,
    expected_breakdown,
    expected_rollups,
    stored_breakdown,
    stored_rollups,
)
from tests.procs import trackbuf
from tests.servers import Beanstalkd
from trackbuf import codec
from trackbuf.events import Event, new_event

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)


def opened(when: datetime, campaign: str, recipient: str) -> Event:
    return new_event("open", campaign, recipient, now_ns=int(when.timestamp() * 1e9),
                     user_agent=IPHONE, ip=HOME)  # fmt: skip


def job(events: list[Event]) -> bytes:
    return codec.encode_job([codec.encode_event(e) for e in events])


def send(beanstalkd: Beanstalkd, settings: Any, *jobs: bytes) -> None:
    with beanstalkd.client() as client:
        for body in jobs:
            client.put(body)
    assert drain(settings) == 0


def totals(dsn: str, campaign: str, kind: str = "open") -> tuple[int, int, int, int]:
    """(total, unique, human total, human unique) as `trackbuf stats` adds them up."""
    (row,) = rows(dsn, "SELECT coalesce(sum(total), 0) AS t, coalesce(sum(uniq), 0) AS u,"
                       " coalesce(sum(human_total), 0) AS h, coalesce(sum(human_uniq), 0) AS hu"
                       f" FROM rollups WHERE campaign = '{campaign}' AND kind = '{kind}'"
                       " AND url = ''")  # fmt: skip
    return (row["t"], row["u"], row["h"], row["hu"])


def rebuild(settings: Any) -> None:
    done = trackbuf(settings, "rollups", "rebuild")
    assert done.returncode == 0, done.stderr


def test_1_4_6_prune_keeps_past_counts_through_rebuild_and_redelivery(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    settings = make_settings(threads=1)
    dsn = settings.database_url
    old = NOW - timedelta(days=100)
    old_job = job([opened(old, "s", "r1"), opened(old + timedelta(hours=1), "s", "r1"),
                   opened(old, "s", "r2"), opened(old + timedelta(days=1), "s", "r3")])  # fmt: skip
    recent = NOW - timedelta(hours=1)
    send(beanstalkd, settings, old_job, job([opened(recent, "s", "r1"), opened(recent, "s", "r4")]))
    assert totals(dsn, "s") == (6, 4, 6, 4)
    before = stored_rollups(dsn)

    done = trackbuf(settings, "prune", "--older-than", "30d")
    assert done.returncode == 0, done.stderr
    assert len(rows(dsn)) == 2
    # (1) The pruned months' counts stay, and a rebuild keeps them.
    assert stored_rollups(dsn) == before
    rebuild(settings)
    assert stored_rollups(dsn) == before
    # (6) Recipients none of whose events are left are gone from first_events; r1, who
    # still has an event, is kept as counted in a pruned month, with no pruned time.
    firsts = rows(dsn, "SELECT recipient, first_at = '-infinity' AS carried FROM first_events")
    assert {(r["recipient"], r["carried"]) for r in firsts} == {("r1", True), ("r4", False)}

    # (4) The old job delivered again (a binlog replay, say): recognised, not stored in
    # the DEFAULT partition, not counted again.
    send(beanstalkd, settings, old_job)
    assert len(rows(dsn)) == 2
    assert stored_rollups(dsn) == before

    # r1 again: a new open, but not a new unique (counted in the pruned month).
    send(beanstalkd, settings, job([opened(NOW, "s", "r1")]))
    assert totals(dsn, "s") == (7, 4, 7, 4)
    after = stored_rollups(dsn)
    rebuild(settings)
    assert stored_rollups(dsn) == after


def test_2_a_burst_across_batches_marks_every_click_and_the_counts_follow(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    settings = make_settings(threads=1)
    dsn = settings.database_url
    scanner = [at(i * 0.3, "click", "x", "scanned", url=link, user_agent=CHROME, ip=HOME)
               for i, link in enumerate(LINKS)]  # fmt: skip
    # Two links in the first batch (no burst yet), two more in the next.
    send(beanstalkd, settings, job(scanner[:2]))
    assert totals(dsn, "x", "click")[2:] == (2, 1)
    send(beanstalkd, settings, job(scanner[2:]))
    stored = rows(dsn)
    assert [r["machine_reason"] for r in stored] == ["burst_clicks"] * 4
    assert totals(dsn, "x", "click") == (4, 1, 0, 0)
    assert stored_rollups(dsn) == expected_rollups(stored)
    assert stored_breakdown(dsn) == expected_breakdown(stored)
    live = stored_rollups(dsn)
    rebuild(settings)
    assert stored_rollups(dsn) == live
    assert stored_breakdown(dsn) == expected_breakdown(stored)


def test_a_persons_first_click_made_a_scanners_moves_their_human_unique(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    settings = make_settings(threads=1)
    dsn = settings.database_url
    person = at(3600 * 5, "click", "y", "r", url=LINKS[0], user_agent=CHROME, ip=HOME)
    early = at(0, "click", "y", "r", url=LINKS[1], user_agent=CHROME, ip=HOME)
    send(beanstalkd, settings, job([early, person]))
    # The early click was this person's first: then two more links within a second of
    # it arrive (a scanner at delivery), so it was a scanner's, and the human unique
    # moves to the click five hours later.
    burst = [at(0.2 + i * 0.2, "click", "y", "r", url=link, user_agent=CHROME, ip=HOME)
             for i, link in enumerate(LINKS[2:])]  # fmt: skip
    send(beanstalkd, settings, job(burst))
    stored = rows(dsn)
    assert sorted(r["machine_reason"] or "" for r in stored) == [""] + ["burst_clicks"] * 3
    assert stored_rollups(dsn) == expected_rollups(stored)


def test_an_earlier_event_stored_later_moves_the_unique_to_its_hour(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    settings = make_settings(threads=1)
    dsn = settings.database_url
    late = at(7200, "open", "z", "r", user_agent=IPHONE, ip=HOME)
    prefetch = at(0, "open", "z", "r", user_agent="Mozilla/5.0", ip="17.58.1.9")
    first = at(3600, "open", "z", "r", user_agent=IPHONE, ip=HOME)
    send(beanstalkd, settings, job([late]))
    send(beanstalkd, settings, job([prefetch]))
    send(beanstalkd, settings, job([first]))
    stored = rows(dsn)
    assert stored_rollups(dsn) == expected_rollups(stored)
    live = stored_rollups(dsn)
    rebuild(settings)
    assert stored_rollups(dsn) == live


def test_5_a_recipient_back_after_their_tombstone_expired_is_counted_once(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    settings = make_settings(threads=1)
    dsn = settings.database_url
    send(beanstalkd, settings, job([opened(NOW - timedelta(hours=2), "f", "r1"),
                                    opened(NOW - timedelta(hours=2), "f", "r2")]))  # fmt: skip
    assert totals(dsn, "f") == (2, 2, 2, 2)
    gone = trackbuf(settings, "forget", "--recipient", "r1")
    assert gone.returncode == 0, gone.stderr
    # Forget takes the person's stored events out of the counts with them.
    assert totals(dsn, "f") == (1, 1, 1, 1)
    assert stored_rollups(dsn) == expected_rollups(rows(dsn))
    rows(dsn, "UPDATE forgotten SET keep_until = now() - interval '1 second'")
    send(beanstalkd, settings, job([opened(NOW, "f", "r1")]))
    # Two people, two uniques (not three), and a rebuild agrees.
    assert totals(dsn, "f") == (2, 2, 2, 2)
    live = stored_rollups(dsn)
    assert live == expected_rollups(rows(dsn))
    rebuild(settings)
    assert stored_rollups(dsn) == live
