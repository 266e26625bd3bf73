"""The reports, read from the rollups: what ``trackbuf stats --campaign C`` prints
(``commands/stats.py``) and the benchmarks time.

Totals and unique recipients for opens and clicks, people apart from machines (with
the machine share by reason), the click-to-open rate, the top links and the mail
clients; ``--by link`` and ``--by day`` for the detail, ``--since``/``--until`` (dates,
inclusive) and ``--tz`` for the calendar they are read in. Every figure comes from the
rollups the consumer maintains (docs/ANALYTICS.md), never from a scan of raw events.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from store.sql import query

KINDS = ("open", "click")


class BadRequest(ValueError):
    """A flag the report cannot use; the message says which and why."""


@dataclass(frozen=True)
class Period:
    """Calendar dates in a time zone, as the half-open range of UTC hours they cover."""

    since: date | None
    until: date | None
    tz: str
    start: datetime | None  # first hour in, UTC
    end: datetime | None  # first hour out, UTC

    @classmethod
    def parse(cls, since: str | None, until: str | None, tz: str) -> Period:
        try:
            zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise BadRequest(
                f"--tz {tz!r} is not a time zone name (e.g. UTC, Europe/Paris)"
            ) from None
        first, last = _date("--since", since), _date("--until", until)
        if first and last and last < first:
            raise BadRequest(f"--until {last} is before --since {first}")

        def midnight(day: date) -> datetime:
            return datetime.combine(day, time(), zone).astimezone(UTC)

        return cls(
            since=first,
            until=last,
            tz=tz,
            start=midnight(first) if first else None,
            end=midnight(last + timedelta(days=1)) if last else None,
        )

    def whole_hours(self) -> bool:
        """Do this zone's offsets fall on whole hours (so hourly rollups make its days)?"""
        zone = ZoneInfo(self.tz)
        moments = [m for m in (self.start, self.end) if m] or [datetime.now(UTC)]
        offsets = [m.astimezone(zone).utcoffset() or timedelta() for m in moments]
        return all(offset % timedelta(hours=1) == timedelta() for offset in offsets)


def _date(flag: str, text: str | None) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{flag} {text!r} is not a date (YYYY-MM-DD)") from None


def _counts(row: Any | None) -> dict[str, Any]:
    total, uniq, human, human_uniq, proxied = (
        (row["total"], row["uniq"], row["human_total"], row["human_uniq"], row["proxied_total"])
        if row
        else (0, 0, 0, 0, 0)
    )
    return {
        "total": total,
        "unique_recipients": uniq,
        # People's events, direct and through a proxy (webmail image proxies).
        "human_total": human,
        "human_unique_recipients": human_uniq,
        "proxied_total": proxied,
        "machine_total": total - human,
    }


def rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def build(
    campaign: str,
    period: Period,
    totals: list[Any],
    breakdown: list[Any],
    links: list[Any],
    days: list[Any] | None,
) -> dict[str, Any]:
    """The report as one JSON-ready dict (the shape ``--json`` prints)."""
    by_kind = {row["kind"]: row for row in totals}
    report: dict[str, Any] = {
        "campaign": campaign,
        "since": period.since.isoformat() if period.since else None,
        "until": period.until.isoformat() if period.until else None,
        "tz": period.tz,
    }
    for kind in KINDS:
        counts = _counts(by_kind.get(kind))
        reasons = {r["value"]: r["total"] for r in breakdown
                   if r["kind"] == kind and r["dimension"] == "reason"}  # fmt: skip
        counts["machine_by_reason"] = [
            {"reason": reason, "total": n, "share": rate(n, counts["total"])}
            for reason, n in reasons.items()
        ]
        counts["machine_share"] = rate(counts["machine_total"], counts["total"])
        counts["proxied_share"] = rate(counts["proxied_total"], counts["total"])
        counts["proxied_by_proxy"] = [
            {"proxy": r["value"], "total": r["total"], "share": rate(r["total"], counts["total"])}
            for r in breakdown
            if r["kind"] == kind and r["dimension"] == "proxy"
        ]
        counts["clients"] = [
            {"client": r["value"], "total": r["total"],
             "share": rate(r["total"], counts["human_total"] - counts["proxied_total"])}
            for r in breakdown
            if r["kind"] == kind and r["dimension"] == "client"
        ]  # fmt: skip
        report[kind] = counts
    report["click_to_open_rate"] = rate(
        report["click"]["human_unique_recipients"], report["open"]["human_unique_recipients"]
    )
    report["links"] = [_link(row) for row in links]
    if days is not None:
        report["days"] = _days(days)
    return report


def _link(row: Any) -> dict[str, Any]:
    return {
        "url": row["url"],
        "clicks": row["total"],
        "unique_clickers": row["uniq"],
        "human_clicks": row["human_total"],
        "human_unique_clickers": row["human_uniq"],
    }


def _days(rows: list[Any]) -> list[dict[str, Any]]:
    out: dict[date, dict[str, Any]] = {}
    for row in rows:
        day = out.setdefault(row["day"], {"day": row["day"].isoformat()})
        day[row["kind"]] = {
            "total": row["total"],
            "new_unique_recipients": row["uniq"],
            "human_total": row["human_total"],
            "new_human_unique_recipients": row["human_uniq"],
        }
    empty = dict.fromkeys(
        ("total", "new_unique_recipients", "human_total", "new_human_unique_recipients"), 0
    )
    return [{"day": d["day"], **{k: d.get(k, dict(empty)) for k in KINDS}} for d in out.values()]


async def fetch(
    conn: asyncpg.Connection, name: str, period: Period, by: str | None
) -> tuple[dict[str, Any], bool]:
    """The report for one campaign, read from the rollups, and whether anything is
    stored for it in the period (the benchmarks time this)."""
    window = (name, period.start, period.end)
    totals = await conn.fetch(query("report_totals"), *window)
    breakdown = await conn.fetch(query("report_breakdown"), *window)
    links = await conn.fetch(query("report_links"), *window)
    days = await conn.fetch(query("report_days"), *window, period.tz) if by == "day" else None
    report = build(name, period, list(totals), list(breakdown), list(links),
                   None if days is None else list(days))  # fmt: skip
    return report, bool(totals)
