"""`trackbuf stats` as an operator runs it: text and --json, from the rollups."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.test_pipeline import drain, rows
from tests.integration.test_rollups import CHROME, GMAIL_PROXY, HOME, IPHONE, OUTLOOK, put
from tests.procs import trackbuf
from tests.servers import Beanstalkd
from trackbuf import codec
from trackbuf.events import Event, new_event

pytestmark = pytest.mark.integration

SALE, NEW = "https://shop.example/sale", "https://shop.example/new"


def on(when: str, kind: str, recipient: str, **extra: Any) -> Event:
    from datetime import datetime

    ns = int(datetime.fromisoformat(when).timestamp() * 1e9)
    return new_event(kind, "spring", recipient, now_ns=ns, **extra)


# Two UTC days. "late" opens at 23:30 UTC on the 1st: the 2nd in Paris (UTC+1).
EVENTS = [
    on("2026-12-01T08:00:00+00:00", "open", "ann", user_agent="Mozilla/5.0", ip="17.58.1.9"),
    on("2026-12-01T09:00:00+00:00", "open", "ann", user_agent=IPHONE, ip=HOME),
    on("2026-12-01T09:00:05+00:00", "click", "ann", url=SALE, user_agent=CHROME, ip=HOME),
    on("2026-12-01T09:30:00+00:00", "open", "bob", user_agent=GMAIL_PROXY),
    on("2026-12-01T10:00:00+00:00", "open", "bob", user_agent=OUTLOOK, ip=HOME),
    on("2026-12-01T10:00:09+00:00", "click", "bob", url=NEW, user_agent=CHROME, ip=HOME),
    on("2026-12-01T10:00:20+00:00", "click", "bob", url=SALE, user_agent=CHROME, ip=HOME),
    on("2026-12-01T23:30:00+00:00", "open", "late", user_agent=IPHONE, ip=HOME),
    on("2026-12-02T07:00:00+00:00", "open", "cy", user_agent=IPHONE, ip=HOME),
    on("2026-12-02T07:00:00+00:00", "click", "cy", url=SALE, user_agent="curl/8.4.0", ip=HOME),
    on("2026-12-02T07:10:00+00:00", "open", "ann", user_agent=IPHONE, ip=HOME),
]
# Besides, someone else's campaign, never counted here.
OTHER = new_event("open", "autumn", "ann", user_agent=IPHONE, ip=HOME)


@pytest.fixture
def loaded(make_settings, beanstalkd: Beanstalkd):  # type: ignore[no-untyped-def]
    settings = make_settings()
    put(beanstalkd, [codec.encode_job([codec.encode_event(e) for e in [*EVENTS, OTHER]])])
    assert drain(settings) == 0
    return settings


def stats(settings: Any, *args: str) -> tuple[int, str, str]:
    done = trackbuf(settings, "stats", "--campaign", "spring", *args)
    return done.returncode, done.stdout, done.stderr


def test_json_report_has_every_figure_a_mail_team_reads(loaded: Any) -> None:
    code, out, err = stats(loaded, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["campaign"] == "spring" and report["tz"] == "UTC"
    opens, clicks = report["open"], report["click"]
    # bob's open through Gmail's image proxy is a person's (proxied): in people's
    # figures, and shown apart beside the machines.
    assert {k: opens[k] for k in ("total", "unique_recipients", "human_total",
                                  "human_unique_recipients", "proxied_total",
                                  "machine_total")} == {
        "total": 7, "unique_recipients": 4, "human_total": 6, "human_unique_recipients": 4,
        "proxied_total": 1, "machine_total": 1}  # fmt: skip
    assert opens["machine_by_reason"] == [
        {"reason": "apple_mpp", "total": 1, "share": round(1 / 7, 4)},
    ]
    assert opens["proxied_by_proxy"] == [
        {"proxy": "google_image_proxy", "total": 1, "share": round(1 / 7, 4)},
    ]
    assert (opens["proxied_share"], opens["machine_share"]) == (round(1 / 7, 4), round(1 / 7, 4))
    assert {k: clicks[k] for k in ("total", "unique_recipients", "human_total",
                                   "human_unique_recipients")} == {
        "total": 4, "unique_recipients": 3, "human_total": 3,
        "human_unique_recipients": 2}  # fmt: skip
    assert clicks["machine_by_reason"] == [{"reason": "bot", "total": 1, "share": 0.25}]
    assert report["click_to_open_rate"] == 0.5  # 2 people clicked of 4 who opened
    assert report["links"] == [
        {"url": SALE, "clicks": 3, "unique_clickers": 3, "human_clicks": 2,
         "human_unique_clickers": 2},
        {"url": NEW, "clicks": 1, "unique_clickers": 1, "human_clicks": 1,
         "human_unique_clickers": 1},
    ]  # fmt: skip
    assert opens["clients"] == [
        {"client": "Mobile Safari UI/WKWebView", "total": 4, "share": 0.8},
        {"client": "Outlook", "total": 1, "share": 0.2},
    ]


def test_reports_come_from_the_rollups_not_the_raw_rows(loaded: Any) -> None:
    before = stats(loaded, "--json")[1]
    rows(loaded.database_url, "DELETE FROM events")  # e.g. raw rows expired
    assert stats(loaded, "--json")[1] == before


def test_by_day_in_a_time_zone_and_a_date_range(loaded: Any) -> None:
    code, out, err = stats(loaded, "--json", "--by", "day")
    assert code == 0, err
    days = {d["day"]: d for d in json.loads(out)["days"]}
    assert [(day, d["open"]["total"], d["click"]["total"]) for day, d in days.items()] == [
        ("2026-12-01", 5, 3), ("2026-12-02", 2, 1)]  # fmt: skip
    # ann first opened on the 1st: on the 2nd only cy is a new unique opener.
    assert days["2026-12-02"]["open"]["new_unique_recipients"] == 1

    code, out, err = stats(loaded, "--json", "--by", "day", "--tz", "Europe/Paris")
    assert code == 0, err
    paris = {d["day"]: d["open"]["total"] for d in json.loads(out)["days"]}
    assert paris == {"2026-12-01": 4, "2026-12-02": 3}  # "late" moved to the 2nd

    code, out, _ = stats(loaded, "--json", "--since", "2026-12-02", "--tz", "Europe/Paris")
    report = json.loads(out)
    assert (report["open"]["total"], report["click"]["total"]) == (3, 1)
    assert report["since"] == "2026-12-02" and report["until"] is None
    code, out, _ = stats(loaded, "--json", "--until", "2026-12-01")
    assert json.loads(out)["open"]["total"] == 5


def test_text_report(loaded: Any) -> None:
    code, out, err = stats(loaded)
    assert code == 0, err
    assert out.startswith("campaign spring  (all days, UTC)")
    lines = out.splitlines()
    assert any(line.split() == ["opens", "7", "4", "6", "4", "1", "1"] for line in lines), out
    assert any(line.split() == ["clicks", "4", "3", "3", "2", "0", "1"] for line in lines), out
    assert any(line.split() == ["opens", "71.4%", "14.3%", "14.3%"] for line in lines), out
    assert any(line.split() == ["google_image_proxy", "opens", "1", "14.3%"] for line in lines)
    assert "click-to-open rate 50.0%" in out
    assert any(line.split() == ["apple_mpp", "opens", "1", "14.3%"] for line in lines), out
    assert any(line.split() == ["2", "2", "3", "3", SALE] for line in lines), out
    assert any(line.split()[-2:] == ["4", "80.0%"] for line in lines), out
    code, out, _ = stats(loaded, "--by", "day", "--tz", "Europe/Paris")
    assert "by day (Europe/Paris" in out
    assert any(line.split()[:2] == ["2026-12-02", "3"] for line in out.splitlines()), out
    code, out, _ = stats(loaded, "--by", "link")
    assert "links, by unique human clickers" in out and NEW in out


def test_a_campaign_without_events_and_bad_flags(loaded: Any) -> None:
    done = trackbuf(loaded, "stats", "--campaign", "nothing-sent")
    assert done.returncode == 0 and done.stdout.strip() == (
        "no events stored for campaign 'nothing-sent' (names are case-sensitive)"
    )
    done = trackbuf(loaded, "stats", "--campaign", "nothing-sent", "--json")
    assert done.returncode == 0
    report = json.loads(done.stdout)
    assert report["open"]["total"] == 0 and report["click_to_open_rate"] is None
    assert report["links"] == []
    for flags, message in (
        (("--tz", "Mars/Olympus"), "--tz 'Mars/Olympus' is not a time zone name"),
        (("--since", "yesterday"), "--since 'yesterday' is not a date (YYYY-MM-DD)"),
        (("--since", "2026-12-02", "--until", "2026-12-01"), "is before --since"),
    ):
        code, _, err = stats(loaded, *flags)
        assert code == 2 and message in err and "Traceback" not in err, err
