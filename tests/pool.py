"""Helpers for tests over a pool of beanstalkd servers (see ``beanstalkd_pool``)."""

from __future__ import annotations

import time

from tests.integration.test_pipeline import rows
from tests.servers import Beanstalkd
from trackbuf import codec
from trackbuf.events import new_event


def fill(servers: list[Beanstalkd], jobs_each: int, events_per_job: int = 1) -> set[str]:
    """Put ``jobs_each`` jobs on every server; the recipients of all their events."""
    sent: set[str] = set()
    for s, server in enumerate(servers):
        with server.client() as client:
            for j in range(jobs_each):
                recipients = [f"s{s}-j{j}-e{e}" for e in range(events_per_job)]
                events = [codec.encode_event(new_event("open", "pool", r)) for r in recipients]
                client.put(codec.encode_job(events))
                sent.update(recipients)
    return sent


def stored(database_url: str) -> list[str]:
    """Every stored event's recipient (a duplicate would show twice)."""
    return [row["recipient"] for row in rows(database_url, "SELECT recipient FROM events")]


def wait_stored(database_url: str, count: int, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = stored(database_url)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def backlog(server: Beanstalkd) -> int:
    """Jobs still ready or reserved on one server."""
    stats = server.tube_stats()
    return stats["current-jobs-ready"] + stats["current-jobs-reserved"]
