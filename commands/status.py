"""``trackbuf status``: the queue on one screen, and a non-zero exit when it is unwell.

Reads beanstalkd directly (depth, oldest ready age, consumers, job rates) and the
ingest and consumer ``/metrics`` pages (event rates, spool, database state). Rates are
two samples about ``interval`` seconds apart, divided by the time measured between
them: a slow scrape or a busy machine stretches that time, and dividing by the
requested interval would overstate every rate.

Over a pool of beanstalkd servers each server gets a line (and an entry in the JSON
``servers`` list); the queue totals add up the servers that answered. A server that is
down is a problem of its own; the others are still shown.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Generic, TypeVar

import orjson
from prometheus_client.parser import text_string_to_metric_families

from trackbuf import metric_names as names
from trackbuf.beanstalk_client import NotAnswering
from trackbuf.queue_snapshot import STATES, QueueSnapshot, server_name, snapshots
from trackbuf.settings import Settings

# Reserve commands per second beyond 3 per job reserved that say the consumer polls
# beanstalkd. Waiting costs about one per job, plus one a second per idle connection;
# the polling design this replaced sent tens per job, thousands a second.
POLLING_EXCESS_PER_S = 50.0


@dataclass
class ServerStatus:
    """One beanstalkd server of the pool, as ``trackbuf status`` saw it."""

    address: str
    up: bool
    # Took the connection and did not answer: memory pressure, a stuck disk, stopped.
    hung: bool = False
    jobs: dict[str, int] = field(default_factory=dict)
    oldest_ready_age_s: int = 0
    consumers: int = 0
    binlog_span_files: int = 0
    jobs_in_per_s: float = 0.0
    jobs_out_per_s: float = 0.0


@dataclass
class Status:
    at: str
    beanstalkd: str
    tube: str
    # Every server of the pool answered (the totals below then cover the whole pool).
    beanstalkd_up: bool
    jobs: dict[str, int] = field(default_factory=dict)
    oldest_ready_age_s: int = 0
    consumers: int = 0
    binlog_span_files: int = 0
    jobs_in_per_s: float = 0.0
    jobs_out_per_s: float = 0.0
    events_in_per_s: float | None = None
    events_out_per_s: float | None = None
    spool_jobs: float | None = None
    spool_bytes: float | None = None
    spool_events: float | None = None
    # Servers ingest keeps above their high-water mark (new events go to its disk).
    servers_full: float | None = None
    database_up: bool | None = None
    # reserve commands the consumer sent per second, and per job it reserved (None
    # while no job was reserved between the samples)
    reserves_per_s: float | None = None
    reserves_per_job: float | None = None
    servers: list[ServerStatus] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Where the addresses checked came from (a flag, the environment, a running `up`'s
    # env file, or the defaults), so a status of the wrong server cannot pass for ours.
    source: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


T = TypeVar("T")


@dataclass(frozen=True)
class Sample(Generic[T]):
    value: T | None
    at: float  # time.monotonic() when the answer was complete


def sample(read: Callable[[], T | None]) -> Sample[T]:
    value = read()
    return Sample(value, time.monotonic())


def per_second(before: float, after: float, first: Sample[T], second: Sample[T]) -> float:
    """A counter's rate between two samples; a counter that went down (a restart) is
    reported as 0 rather than negative."""
    elapsed = second.at - first.at
    if elapsed <= 0:
        return 0.0
    return max(after - before, 0.0) / elapsed


def _queue(settings: Settings) -> list[QueueSnapshot | BaseException]:
    """A snapshot of every server of the pool, or why it could not be had."""
    return snapshots(settings.beanstalkd_addresses, settings.tube)


def scrape(url: str) -> dict[str, float] | None:
    """The sum of each sample name's values on a /metrics page (labels folded), or
    None when the page cannot be had or is not Prometheus text."""
    if not url:
        return None
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (OSError, UnicodeDecodeError):
        return None
    totals: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    except ValueError:
        return None
    return totals


def gather(
    settings: Settings, ingest_url: str, consumer_url: str, interval: float, max_age_s: int
) -> Status:
    status = Status(
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        beanstalkd=settings.beanstalkd,
        tube=settings.tube,
        beanstalkd_up=False,
    )
    events_in, events_out = names.INGEST_EVENTS + "_total", names.CONSUMER_EVENTS_WRITTEN + "_total"
    queue_1 = sample(lambda: _queue(settings))
    ingest_1 = sample(lambda: scrape(ingest_url))
    consumer_1 = sample(lambda: scrape(consumer_url))
    time.sleep(interval)
    ingest_2 = sample(lambda: scrape(ingest_url))
    consumer_2 = sample(lambda: scrape(consumer_url))
    queue_2 = sample(lambda: _queue(settings))
    ingest_before, ingest_after = ingest_1.value, ingest_2.value
    consumer_before, consumer_after = consumer_1.value, consumer_2.value

    status.jobs = dict.fromkeys(STATES, 0)
    for address, first, second in zip(
        settings.beanstalkd_addresses, queue_1.value or [], queue_2.value or [], strict=True
    ):
        server = ServerStatus(server_name(address), up=False)
        status.servers.append(server)
        if not isinstance(first, QueueSnapshot) or not isinstance(second, QueueSnapshot):
            failed = second if not isinstance(second, QueueSnapshot) else first
            server.hung = isinstance(failed, NotAnswering)
            if server.hung:
                status.problems.append(
                    f"beanstalkd {server.address} accepts connections but does not answer "
                    "(hung: out of memory, a stuck disk, or stopped)"
                )
            else:
                status.problems.append(f"beanstalkd {server.address} is unreachable")
            continue
        server.up = True
        server.jobs = second.jobs
        server.oldest_ready_age_s = second.oldest_ready_age_s
        server.consumers = second.consumers
        server.binlog_span_files = second.binlog_span
        server.jobs_in_per_s = per_second(first.jobs_put, second.jobs_put, queue_1, queue_2)
        server.jobs_out_per_s = per_second(
            first.jobs_deleted, second.jobs_deleted, queue_1, queue_2
        )
        _server_problems(
            server, status.problems, max_age_s, pooled=len(settings.beanstalkd_addresses) > 1
        )
    up = [server for server in status.servers if server.up]
    status.beanstalkd_up = len(up) == len(status.servers)
    for server in up:
        for state, count in server.jobs.items():
            status.jobs[state] += count
        status.oldest_ready_age_s = max(status.oldest_ready_age_s, server.oldest_ready_age_s)
        status.consumers += server.consumers
        status.binlog_span_files = max(status.binlog_span_files, server.binlog_span_files)
        status.jobs_in_per_s += server.jobs_in_per_s
        status.jobs_out_per_s += server.jobs_out_per_s
    if not up:
        status.jobs = {}

    if ingest_after is None:
        if ingest_url:
            status.problems.append(f"ingest metrics unreachable at {ingest_url}")
    else:
        status.spool_jobs = ingest_after.get(names.INGEST_SPOOL_JOBS, 0.0)
        status.spool_bytes = ingest_after.get(names.INGEST_SPOOL_BYTES, 0.0)
        status.spool_events = ingest_after.get(names.INGEST_SPOOL_EVENTS, 0.0)
        status.servers_full = ingest_after.get(names.INGEST_QUEUE_FULL, 0.0)
        if ingest_before is not None:
            status.events_in_per_s = per_second(
                ingest_before.get(events_in, 0.0), ingest_after.get(events_in, 0.0),
                ingest_1, ingest_2,
            )  # fmt: skip
        if status.spool_jobs:
            status.problems.append(
                f"ingest is spooling: {status.spool_events:,.0f} event(s) in "
                f"{status.spool_jobs:,.0f} job(s), {status.spool_bytes:,.0f} bytes on disk"
            )
        if status.servers_full:
            status.problems.append(
                f"{status.servers_full:.0f} beanstalkd server(s) above the high-water mark: "
                "new events go to ingest's disk until the consumer drains them"
            )
        hung = ingest_after.get(names.INGEST_BEANSTALKD_HUNG, 0.0)
        if hung:
            status.problems.append(
                f"ingest finds {hung:.0f} beanstalkd server(s) hung (connected, no answers)"
            )
    if consumer_after is None:
        if consumer_url:
            status.problems.append(f"consumer metrics unreachable at {consumer_url}")
    else:
        status.database_up = consumer_after.get(names.CONSUMER_DATABASE_UP, 0.0) >= 1
        if consumer_before is not None:
            status.events_out_per_s = per_second(
                consumer_before.get(events_out, 0.0), consumer_after.get(events_out, 0.0),
                consumer_1, consumer_2,
            )  # fmt: skip
        if not status.database_up:
            status.problems.append("consumer cannot reach the database")
        if consumer_before is not None:
            _reserves(status, consumer_before, consumer_after, consumer_1, consumer_2)
    return status


def _reserves(
    status: Status,
    before: dict[str, float],
    after: dict[str, float],
    first: Sample[dict[str, float]],
    second: Sample[dict[str, float]],
) -> None:
    """Reserve commands per job between the samples: about 1 while the consumer waits
    in beanstalkd; far more means it polls again (and burns beanstalkd's CPU too)."""
    reserves, jobs = (
        names.CONSUMER_RESERVE_COMMANDS + "_total",
        names.CONSUMER_JOBS_RESERVED + "_total",
    )
    if reserves not in after:
        return  # a consumer from before these counters
    status.reserves_per_s = per_second(before.get(reserves, 0.0), after[reserves], first, second)
    jobs_per_s = per_second(before.get(jobs, 0.0), after.get(jobs, 0.0), first, second)
    if jobs_per_s > 0:
        status.reserves_per_job = status.reserves_per_s / jobs_per_s
    if status.reserves_per_s - 3 * jobs_per_s > POLLING_EXCESS_PER_S:
        status.problems.append(
            f"consumer polls beanstalkd: {status.reserves_per_s:,.0f} reserve commands/s "
            f"for {jobs_per_s:,.0f} jobs/s"
        )


def _server_problems(
    server: ServerStatus, problems: list[str], max_age_s: int, pooled: bool
) -> None:
    where = f"beanstalkd {server.address}: " if pooled else ""
    if server.jobs["ready"] and server.consumers == 0:
        problems.append(f"{where}jobs are waiting and no consumer is connected")
    if server.oldest_ready_age_s > max_age_s:
        problems.append(
            f"{where}oldest ready job is {server.oldest_ready_age_s}s old (limit {max_age_s}s)"
        )
    if server.jobs["buried"]:
        problems.append(f"{where}{server.jobs['buried']} buried job(s): beanstalkd out of memory?")


def _pool_state(status: Status) -> str:
    down = sum(not server.up for server in status.servers)
    if status.beanstalkd_up:
        return "up"
    if len(status.servers) == 1 and status.servers[0].hung:
        return "HUNG"
    if len(status.servers) > 1 and down < len(status.servers):
        return f"{down} of {len(status.servers)} DOWN"
    return "DOWN"


def render(status: Status) -> str:
    def rate(value: float | None) -> str:
        return "?" if value is None else f"{value:,.0f}/s"

    jobs = status.jobs or dict.fromkeys(STATES, 0)
    lines = [
        f"trackbuf status  {status.at}",
        *([f"checking  {status.source}"] if status.source else []),
        f"queue     beanstalkd {status.beanstalkd} ({_pool_state(status)})  tube {status.tube}",
        "          "
        + "  ".join(f"{k} {v:,}" for k, v in jobs.items())
        + f"  oldest ready {status.oldest_ready_age_s}s",
        f"          consumers {status.consumers}  jobs in {rate(status.jobs_in_per_s)}"
        f"  jobs out {rate(status.jobs_out_per_s)}  binlog span {status.binlog_span_files}",
    ]
    if len(status.servers) > 1:
        # The lines above are the pool's totals; one line per server follows.
        for server in status.servers:
            if not server.up:
                lines.append(f"server    {server.address}  {'HUNG' if server.hung else 'DOWN'}")
                continue
            lines.append(
                f"server    {server.address}  "
                + "  ".join(f"{k} {v:,}" for k, v in server.jobs.items())
                + f"  oldest ready {server.oldest_ready_age_s}s  consumers {server.consumers}"
                + f"  in {rate(server.jobs_in_per_s)}  out {rate(server.jobs_out_per_s)}"
            )
    lines += [
        f"events    in {rate(status.events_in_per_s)}  stored {rate(status.events_out_per_s)}",
        "ingest    spool "
        + ("?" if status.spool_jobs is None else f"{status.spool_jobs:,.0f} job(s)")
        + ("" if status.spool_events is None else f", {status.spool_events:,.0f} event(s)")
        + ("" if status.spool_bytes is None else f", {status.spool_bytes:,.0f} bytes")
        + ("" if not status.servers_full else f"  above high water {status.servers_full:.0f}"),
        "consumer  database "
        + {None: "?", True: "up", False: "DOWN"}[status.database_up]
        + _reserve_line(status),
    ]
    if status.ok:
        lines.append("OK")
    else:
        lines.extend(f"PROBLEM   {problem}" for problem in status.problems)
    return "\n".join(lines)


def _reserve_line(status: Status) -> str:
    if status.reserves_per_s is None:
        return ""
    per_job = "-" if status.reserves_per_job is None else f"{status.reserves_per_job:.2f}"
    return f"  reserves per job {per_job} ({status.reserves_per_s:,.0f}/s)"


def run(
    settings: Settings,
    as_json: bool,
    watch: bool,
    interval: float,
    max_age_s: int,
    ingest_url: str,
    consumer_url: str,
    source: str = "",
) -> int:
    while True:
        status = gather(settings, ingest_url, consumer_url, interval, max_age_s)
        status.source = source
        if as_json:
            out = orjson.dumps({**asdict(status), "ok": status.ok}).decode()
        else:
            out = render(status)
        if watch and not as_json and sys.stdout.isatty():
            sys.stdout.write("\x1b[2J\x1b[H")  # clear the screen between refreshes
        print(out, flush=True)
        if not watch:
            return 0 if status.ok else 1
