"""``trackbuf stats --campaign C``: a campaign's report as text or JSON (the figures
are ``store/reports.py``'s, read from the rollups)."""

from __future__ import annotations

import sys
from typing import Any

import asyncpg
import orjson

from store.reports import KINDS, BadRequest, Period, fetch, rate

TOP = 10  # links and clients in the summary


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
        direct = rate(r["human_total"] - r["proxied_total"], r["total"])
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
