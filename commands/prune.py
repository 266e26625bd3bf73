"""``trackbuf prune --older-than D``: drop the monthly partitions of ``events`` wholly
older than D, and say what went (the work is ``store/partitions.py``'s ``prune``)."""

from __future__ import annotations

from datetime import timedelta

from commands.database_command import run_command
from store.partitions import DEFAULT_PARTITION, Pruned, PruneError, prune
from trackbuf.settings import Settings


def render(result: Pruned) -> str:
    cutoff = result.cutoff.strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"prune events older than {cutoff}:"]
    lines += [f"  dropped {name}" for name in result.dropped]
    if result.default_rows:
        lines.append(f"  deleted {result.default_rows} row(s) from {DEFAULT_PARTITION}")
    if result.first_events:
        lines.append(f"  deleted {result.first_events} first-event row(s) of recipients "
                     "with no event left")  # fmt: skip
    if not result.dropped and not result.default_rows:
        lines.append("  nothing to drop: no partition lies wholly before the cutoff")
    lines.append(f"{result.kept} month partition(s) kept")
    return "\n".join(lines)


def run(settings: Settings, older_than_s: int) -> int:
    database_url = settings.require_database()
    work = prune(database_url, timedelta(seconds=older_than_s))
    return run_command("prune", work, render, PruneError)
