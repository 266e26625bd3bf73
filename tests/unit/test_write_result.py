"""How a committed batch is counted."""

from __future__ import annotations

from consumer.writer import WriteResult


def test_duplicates_are_the_events_the_insert_skipped() -> None:
    assert WriteResult(events=10, inserted=7).duplicates == 3


def test_a_header_that_undercounts_gives_no_negative_duplicates() -> None:
    # Job headers said 1 event, the insert stored 3: nothing was skipped.
    assert WriteResult(events=1, inserted=3).duplicates == 0
