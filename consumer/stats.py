"""``trackbuf stats --campaign C``: what a mail team reads, from the rollups.

Totals and unique recipients for opens and clicks, people apart from machines (with
the machine share by reason), the click-to-open rate, the top links and the mail
clients; ``--by link`` and ``--by day`` for the detail, ``--since``/``--until`` (dates,
inclusive) and ``--tz`` for the calendar they are read in. Every figure comes from the
rollups the consumer maintains (docs/ANALYTICS.md), never from a scan of raw events.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
import orjson

from consumer.sql import query

KINDS = ("open", "click")
TOP = 10  # links and clients in the summary


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


def _rate(part: int, whole: int) -> float | None:
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
            {"reason": reason, "total": n, "share": _rate(n, counts["total"])}
            for reason, n in reasons.items()
        ]
        counts["machine_share"] = _rate(counts["machine_total"], counts["total"])
        counts["proxied_share"] = _rate(counts["proxied_total"], counts["total"])
        counts["proxied_by_proxy"] = [
            {"proxy": r["value"], "total": r["total"], "share": _rate(r["total"], counts["total"])}
            for r in breakdown
            if r["kind"] == kind and r["dimension"] == "proxy"
        ]
        counts["clients"] = [
            {"client": r["value"], "total": r["total"],
             "share": _rate(r["total"], counts["human_total"] - counts["proxied_total"])}
            for r in breakdown
            if r["kind"] == kind and r["dimension"] == "client"
        ]  # fmt: skip
        report[kind] = counts
    report["click_to_open_rate"] = _rate(
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


# Text -------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def render(report: dict[str, Any], by: str | None) -> str:
    lines = [f"campaign {report['campaign']}  ({_span(report)})", ""]
    lines.append(f"{'':8}{'total':>10}{'unique':>10}{'human':>10}{'human uniq':>12}"
                 f"{'proxied':>10}{'machine':>10}")  # fmt: skip
    for kind in KINDS:
        r = report[kind]
        lines.append(f"{kind + 's':8}{r['total']:>10,}{r['unique_recipients']:>10,}"
                     f"{r['human_total']:>10,}{r['human_unique_recipients']:>12,}"
                     f"{r['proxied_total']:>10,}{r['machine_total']:>10,}")  # fmt: skip
    lines.append("")
    lines.append(f"click-to-open rate {_pct(report['click_to_open_rate'])}"
                 "  (unique human clicks / unique human opens)")  # fmt: skip
    lines += ["", "share of all events: people direct / through a proxy / machines"]
    for kind in KINDS:
        r = report[kind]
        direct = _rate(r["human_total"] - r["proxied_total"], r["total"])
        lines.append(f"  {kind + 's':<8}{_pct(direct):>8}{_pct(r['proxied_share']):>8}"
                     f"{_pct(r['machine_share']):>8}")  # fmt: skip
    proxied = [(kind, p) for kind in KINDS for p in report[kind]["proxied_by_proxy"]]
    if proxied:
        lines += ["", "people through a proxy (device and address hidden), by proxy"]
        lines += [f"  {p['proxy']:<20}{kind + 's':<8}{p['total']:>10,}{_pct(p['share']):>8}"
                  for kind, p in proxied]  # fmt: skip
    machines = [(kind, m) for kind in KINDS for m in report[kind]["machine_by_reason"]]
    if machines:
        lines += ["", "machine share by reason (of all events of that kind)"]
        lines += [f"  {m['reason']:<20}{kind + 's':<8}{m['total']:>10,}{_pct(m['share']):>8}"
                  for kind, m in machines]  # fmt: skip
    if by == "day":
        lines += ["", f"by day ({report['tz']}; unique = first seen that day)"]
        lines.append(f"  {'day':<12}{'opens':>9}{'new uniq':>10}{'human':>9}"
                     f"{'clicks':>9}{'new uniq':>10}{'human':>9}")  # fmt: skip
        for d in report["days"]:
            o, c = d["open"], d["click"]
            lines.append(f"  {d['day']:<12}{o['total']:>9,}{o['new_unique_recipients']:>10,}"
                         f"{o['human_total']:>9,}{c['total']:>9,}"
                         f"{c['new_unique_recipients']:>10,}{c['human_total']:>9,}")  # fmt: skip
    links = report["links"] if by == "link" else report["links"][:TOP]
    if links:
        title = "links" if by == "link" else f"top links (of {len(report['links'])})"
        lines += ["", f"{title}, by unique human clickers"]
        lines.append(f"  {'human uniq':>10}{'human':>8}{'unique':>8}{'clicks':>8}  url")
        lines += [
            f"  {x['human_unique_clickers']:>10,}{x['human_clicks']:>8,}"
            f"{x['unique_clickers']:>8,}{x['clicks']:>8,}  {x['url']}"
            for x in links
        ]
    clients = report["open"]["clients"][:TOP]
    if clients:
        lines += ["", "mail clients (people's direct opens)"]
        lines += [f"  {c['client']:<30}{c['total']:>10,}{_pct(c['share']):>8}" for c in clients]
    return "\n".join(lines)


def _span(report: dict[str, Any]) -> str:
    since, until = report["since"], report["until"]
    if not since and not until:
        return f"all days, {report['tz']}"
    return f"{since or 'start'} to {until or 'now'}, {report['tz']}"


# Command ----------------------------------------------------------------------------


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


async def campaign(
    database_url: str,
    name: str,
    as_json: bool,
    by: str | None = None,
    since: str | None = None,
    until: str | None = None,
    tz: str = "UTC",
) -> int:
    try:
        period = Period.parse(since, until, tz)
    except BadRequest as exc:
        print(f"trackbuf stats: {exc}", file=sys.stderr)
        return 2
    if by == "day" and not period.whole_hours():
        print(f"trackbuf stats: note: {tz} is not a whole number of hours from UTC; the "
              "rollups are hourly, so its days start up to 30 minutes off",
              file=sys.stderr)  # fmt: skip
    conn = await asyncpg.connect(database_url)
    try:
        report, stored = await fetch(conn, name, period, by)
    finally:
        await conn.close()
    if as_json:
        print(orjson.dumps(report).decode())
    elif not stored:
        print(
            f"no events stored for campaign {name!r} (names are case-sensitive)"
            + ("" if not (since or until) else f" ({_span(report)})")
        )
    else:
        print(render(report, by))
    return 0
