"""What the benchmarks send: signed URL lists for wrk, and ready-made jobs to drain."""

from __future__ import annotations

from pathlib import Path

from loadtest import stack as st
from loadtest.servers import Beanstalkd
from loadtest.traffic import wrk_paths
from trackbuf import codec
from trackbuf.events import new_event
from trackbuf.tokens import Keyring

EVENTS_PER_JOB = 25  # what ingest's natural batching produced under load here


def keyring() -> Keyring:
    return Keyring.parse(st.KEYS)


def write_urls(path: Path, count: int) -> Path:
    path.write_text("".join(p + "\n" for p in wrk_paths(keyring(), count, "open", "bench")))
    return path


def make_jobs(count: int, run: str, events_per_job: int = EVENTS_PER_JOB) -> list[bytes]:
    jobs, batch = [], []
    for i in range(count):
        event = new_event("open", f"{run}-c{i % 50}", f"{run}-{i}", user_agent="Mozilla/5.0",
                          ip="203.0.113.7")  # fmt: skip
        batch.append(codec.encode_event(event))
        if len(batch) == events_per_job:
            jobs.append(codec.encode_job(batch))
            batch = []
    if batch:
        jobs.append(codec.encode_job(batch))
    return jobs


def fill(queue: Beanstalkd, jobs: list[bytes]) -> None:
    with queue.client() as client:
        for body in jobs:
            client.put(body, ttr=600)
