"""``trackbuf forget --recipient R [--campaign C]``: erase a person's rows for good, and
say what was removed (the work, and why its order guarantees nothing of R is left, is
``store/forget.py``'s ``forget``)."""

from __future__ import annotations

from commands.database_command import run_command
from store.forget import ForgetError, ForgetResult, forget
from trackbuf.settings import Settings


def render(result: ForgetResult) -> str:
    """What ``forget`` prints: rows removed per table, and how long the tombstone lasts."""
    scope = "all campaigns" if result.campaign is None else f"campaign {result.campaign!r}"
    lines = [f"forget recipient {result.recipient!r}, {scope}:"]
    width = max((len(table) for table, _ in result.deleted), default=0)
    for table, rows in result.deleted:
        lines.append(f"  {table:<{width}}  {rows} row(s) deleted")
    if result.total:
        lines.append(f"{result.total} row(s) deleted in all")
    else:
        lines.append(
            "nothing to delete: no stored row matches (already forgotten, or never stored)"
        )
    until = result.keep_until.strftime("%Y-%m-%d %H:%M UTC")
    lines.append(
        f"tombstone kept until {until}: until then every event for this recipient"
        f"{'' if result.campaign is None else ' in this campaign'} is dropped, whether it"
        " is still queued, spooled, or new"
    )
    if result.expired_tombstones:
        lines.append(f"{result.expired_tombstones} expired tombstone(s) removed")
    return "\n".join(lines)


def run(settings: Settings, recipient: str, campaign: str | None) -> int:
    """The command: erase, print what was removed; exit 1 if it could not finish (then
    nothing, or only the tombstone, is in place, and a second run finishes the job)."""
    database_url = settings.require_database()
    work = forget(database_url, recipient, campaign, settings.forget_keep_days)
    return run_command("forget", work, render, ForgetError)
