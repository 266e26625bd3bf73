"""What `trackbuf forget` prints, and its settings, without servers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from commands.forget import render
from commands.main import build_parser
from store.forget import TARGETS, ForgetResult
from trackbuf.settings import SettingsError, load

UNTIL = datetime(2027, 1, 30, 9, 5, 12, tzinfo=UTC)


def test_the_report_names_each_table_and_the_tombstone_date() -> None:
    outcome = ForgetResult("user-42", None, (("events", 12), ("dead_letters", 1)), UNTIL, 0)
    assert render(outcome).splitlines() == [
        "forget recipient 'user-42', all campaigns:",
        "  events        12 row(s) deleted",
        "  dead_letters  1 row(s) deleted",
        "13 row(s) deleted in all",
        "tombstone kept until 2027-01-30 09:05 UTC: until then every event for this "
        "recipient is dropped, whether it is still queued, spooled, or new",
    ]


def test_a_second_run_says_nothing_was_left() -> None:
    outcome = ForgetResult("user-42", "spring", (("events", 0), ("dead_letters", 0)), UNTIL, 2)
    text = render(outcome)
    assert text.startswith("forget recipient 'user-42', campaign 'spring':")
    assert "nothing to delete: no stored row matches" in text
    assert "every event for this recipient in this campaign is dropped" in text
    assert text.endswith("2 expired tombstone(s) removed")


def test_every_target_condition_uses_the_recipient_and_the_campaign() -> None:
    assert [t.table for t in TARGETS][:2] == ["events", "dead_letters"]
    for target in TARGETS:
        assert "$1" in target.where and "$2" in target.where, target.table


def test_keep_days_default_and_bounds() -> None:
    assert load({}).forget_keep_days == 30
    assert load({"TRACKBUF_FORGET_KEEP_DAYS": "90"}).forget_keep_days == 90
    for bad in ("0", "-1", "36501"):
        with pytest.raises(SettingsError, match="TRACKBUF_FORGET_KEEP_DAYS"):
            load({"TRACKBUF_FORGET_KEEP_DAYS": bad})


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--recipient", ""], "argument --recipient: must not be empty"),
        (["--recipient", "r", "--campaign", ""], "argument --campaign: must not be empty"),
        ([], "the following arguments are required: --recipient"),
    ],
)
def test_an_empty_or_missing_recipient_or_campaign_is_refused(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["forget", *argv])
    assert exited.value.code == 2
    assert says in capsys.readouterr().err
