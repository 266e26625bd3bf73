"""The fault tests' audit (tests/load.py) must be able to fail: each way a stored table
can differ from what the acknowledged requests asked for is reported."""

from __future__ import annotations

from collections import Counter

from tests.load import Sent, compare, planned

CAMPAIGN = "audit"
# Requests 0-3 of a load: 0 is a click, 1-3 are opens.
CLICK, OPEN1, OPEN2, OPEN3 = (planned(CAMPAIGN, i) for i in range(4))
ACKED = {CLICK, OPEN1, OPEN2}  # request 3 failed: its row may or may not be stored


def audit(*rows: Sent) -> tuple[int, int, int]:
    report = compare(CAMPAIGN, ACKED, Counter(rows))
    return report.lost, report.duplicated, report.stray


def test_every_acknowledged_request_stored_once_is_clean() -> None:
    assert CLICK.kind == "click" and CLICK.url and OPEN1.kind == "open" and OPEN1.url is None
    assert audit(CLICK, OPEN1, OPEN2) == (0, 0, 0)


def test_a_failed_request_may_be_stored() -> None:
    assert audit(CLICK, OPEN1, OPEN2, OPEN3) == (0, 0, 0)


def test_a_missing_row_is_lost() -> None:
    assert audit(CLICK, OPEN1) == (1, 0, 0)


def test_a_request_stored_twice_is_duplicated() -> None:
    # Two rows for one request can only differ in event_id: a copy ON CONFLICT misses.
    assert audit(CLICK, OPEN1, OPEN2, OPEN2) == (0, 1, 0)
    assert audit(CLICK, OPEN1, OPEN2, OPEN3, OPEN3) == (0, 1, 0)


def test_a_row_with_the_wrong_kind_or_target_is_lost_and_stray() -> None:
    as_open = Sent("open", CAMPAIGN, CLICK.recipient)
    assert audit(as_open, OPEN1, OPEN2) == (1, 0, 1)
    elsewhere = Sent("click", CAMPAIGN, CLICK.recipient, "https://elsewhere.example/")
    assert audit(elsewhere, OPEN1, OPEN2) == (1, 0, 1)


def test_a_row_no_request_asked_for_is_stray() -> None:
    assert audit(CLICK, OPEN1, OPEN2, Sent("open", CAMPAIGN, "someone-else")) == (0, 0, 1)
    # A failed request's row is excused only if it is the row that request asked for.
    wrong = Sent("click", CAMPAIGN, OPEN3.recipient, "https://shop.example/3")
    assert audit(CLICK, OPEN1, OPEN2, wrong) == (0, 0, 1)
