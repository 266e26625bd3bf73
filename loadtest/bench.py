"""The benchmark runner: every figure measured against its baseline in the same run.

    python -m loadtest bench            # full run (about 30 minutes), rewrites BENCHMARKS.md
    python -m loadtest bench --quick    # seconds, tiny counts: checks the machinery

Sections: ingest (nginx empty_gif, bare aiohttp, naive INSERT-per-request tracker,
trackbuf), ingest under a database outage, a flood of invalid tokens against valid
ones, drain (raw COPY and COPY+staging+ON CONFLICT ceilings, the consumer at 1/2/4/8
threads), an 800,000-event backlog, end-to-end latency at a steady rate, and the spike
demonstration, and the CPU every process spends per million stored events.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ingest.app import TALLY_FLUSH_S
from loadtest import analytics, cost, scaling
from loadtest import stack as st
from loadtest.servers import Beanstalkd, cpu_seconds, free_port
from loadtest.traffic import drive, wrk_paths
from loadtest.workload import EVENTS_PER_JOB, fill, keyring, make_jobs, write_urls
from trackbuf.events import new_event
from trackbuf.httpwait import wait_http
from trackbuf.tokens import Keyring

COLUMNS = ["event_id", "kind", "occurred_at", "campaign", "recipient", "url", "user_agent", "ip"]


@dataclass(frozen=True)
class Plan:
    wrk_s: float = 10
    drain_events: int = 200_000
    thread_counts: tuple[int, ...] = (1, 2, 4, 8)
    backlog_events: int = 800_000
    e2e_rate: float = 5000
    e2e_s: float = 300
    spike_s: float = 60
    spike_rate: float = 1000
    drain_rounds: int = 3  # best of: one slow round (a checkpoint, say) is not the consumer
    ingest_rounds: int = 3  # interleaved, so drift in the machine's speed hits all alike
    fsync_drain_jobs: int = 20_000  # one event each: the fsync-per-delete worst case
    memory_cycles: int = 24
    memory_events: int = 200_000
    report_events: int = 5_000_000  # one campaign, for the report section
    cost_rate: float = 5000  # events/s, paced, for the CPU cost per million events
    cost_s: float = 60
    smooth_rate: float = 3000  # events/s, Poisson arrivals, for the smooth-traffic cost
    smooth_s: float = 30
    smooth_rounds: int = 2  # bare handler and pipeline alternate; best of each
    idle_s: float = 15  # an idle consumer's CPU, measured over this long

    @classmethod
    def quick(cls) -> Plan:
        return cls(wrk_s=1, drain_events=4_000, thread_counts=(1, 2), backlog_events=10_000,
                   e2e_rate=300, e2e_s=3, spike_s=6, spike_rate=200, drain_rounds=1,
                   ingest_rounds=1, fsync_drain_jobs=500, memory_cycles=2,
                   memory_events=2_000, report_events=20_000, cost_rate=400,
                   cost_s=3, smooth_rate=300, smooth_s=3, smooth_rounds=1,
                   idle_s=2)  # fmt: skip


# Ingest ---------------------------------------------------------------------------


def bench_ingest(work: Path, plan: Plan) -> dict[str, Any]:
    stack = st.Stack.start(work, "ingest")
    urls = write_urls(work / "urls.txt", 20_000)
    results: dict[str, Any] = {}
    try:
        nginx, nginx_at = st.start_nginx(work)
        bare, bare_at = st.start_baseline(stack, "bare")
        lowlevel, lowlevel_at = st.start_baseline(stack, "lowlevel")
        naive, naive_at = st.start_baseline(stack, "naive")
        ingest, ingest_at = st.start_ingest(stack)
        targets = {"nginx_empty_gif": nginx_at, "aiohttp_bare": bare_at,
                   "aiohttp_bare_lowlevel": lowlevel_at,
                   "naive_insert_per_request": naive_at, "trackbuf_ingest": ingest_at}  # fmt: skip
        procs = {"nginx_empty_gif": nginx, "aiohttp_bare": bare,
                 "aiohttp_bare_lowlevel": lowlevel,
                 "naive_insert_per_request": naive, "trackbuf_ingest": ingest}  # fmt: skip
        pids = {name: proc.proc.pid for name, proc in procs.items()}
        assert stack.bs.proc is not None
        queue_pid = stack.bs.proc.pid
        rounds: dict[str, list[st.WrkResult]] = {name: [] for name in targets}
        cpu_us: dict[str, list[float]] = {name: [] for name in targets}
        queue_cpu_us: list[float] = []
        for _ in range(plan.ingest_rounds):
            for name, at in targets.items():
                before = cpu_seconds(pids[name]), cpu_seconds(queue_pid)
                run = st.wrk(at, urls, plan.wrk_s)
                after = cpu_seconds(pids[name]), cpu_seconds(queue_pid)
                rounds[name].append(run)
                # Server CPU per answered request: unlike requests/s, this barely moves
                # when wrk, sharing the two cores, gets more or less of them.
                answered = max(run.requests_per_s * max(int(plan.wrk_s), 1), 1)
                cpu_us[name].append(round((after[0] - before[0]) / answered * 1e6, 1))
                if name == "trackbuf_ingest":
                    queue_cpu_us.append(round((after[1] - before[1]) / answered * 1e6, 1))
        for name, runs in rounds.items():
            best = max(runs, key=lambda r: r.requests_per_s)
            results[name] = {**asdict(best), "runs_rps": [r.requests_per_s for r in runs],
                             "cpu_us_per_request": min(cpu_us[name]),
                             "runs_cpu_us": cpu_us[name]}  # fmt: skip
        results["trackbuf_ingest"]["beanstalkd_cpu_us_per_request"] = min(queue_cpu_us)
        rps = {name: results[name]["requests_per_s"] for name in targets}
        cpu = {name: results[name]["cpu_us_per_request"] for name in targets}
        results["ratios"] = {
            "trackbuf_vs_bare": round(rps["trackbuf_ingest"] / rps["aiohttp_bare"], 3),
            # trackbuf runs on the low-level server: this is the ratio to its own floor.
            "trackbuf_vs_bare_lowlevel": round(
                rps["trackbuf_ingest"] / rps["aiohttp_bare_lowlevel"], 3
            ),
            "trackbuf_vs_naive": round(rps["trackbuf_ingest"] / rps["naive_insert_per_request"], 3),
            "trackbuf_vs_nginx": round(rps["trackbuf_ingest"] / rps["nginx_empty_gif"], 3),
            # Requests per CPU-second, trackbuf over bare: the same ratio without wrk.
            "trackbuf_vs_bare_cpu": round(cpu["aiohttp_bare"] / cpu["trackbuf_ingest"], 3),
        }
        # Latency at 70% of trackbuf's measured maximum: wrk paced per connection.
        rate = 0.7 * rps["trackbuf_ingest"]
        paced = st.wrk(ingest_at, urls, max(plan.wrk_s, 3), delay_ms=64 * 1000 / rate)
        results["trackbuf_at_70pct"] = {"target_rate": round(rate), **asdict(paced)}
        results["database_outage"] = ingest_under_outage(stack, urls, plan, naive_at, ingest_at)
        for proc in (ingest, naive, lowlevel, bare, nginx):
            proc.stop()
    finally:
        stack.close()
    return results


def ingest_under_outage(
    stack: st.Stack, urls: Path, plan: Plan, naive_at: str, ingest_at: str
) -> dict[str, Any]:
    """wrk for the run while PostgreSQL is down for its middle third."""
    out: dict[str, Any] = {}
    duration = max(plan.wrk_s, 3)
    for name, at in (("naive_insert_per_request", naive_at), ("trackbuf_ingest", ingest_at)):

        def outage() -> None:
            time.sleep(duration / 3)
            stack.pg.stop()
            time.sleep(duration / 3)
            stack.pg.start()

        fault = threading.Thread(target=outage)
        fault.start()
        result = st.wrk(at, urls, duration)
        fault.join()
        out[name] = asdict(result)
    return out


# A forged token carries the stack's kid, so ingest does the whole HMAC before it
# refuses it: the most expensive invalid token there is.
FORGED_KEYS = "k1:an-attacker-guessed-this-key-0123"
FLOOD_KINDS = ("valid_open", "forged_open", "forged_click", "garbage")


def flood_urls(work: Path, count: int) -> dict[str, Path]:
    """One wrk URL file per kind of request, the same count and shape for each."""
    forged = Keyring.parse(FORGED_KEYS)
    rng = random.Random(count)
    paths = {
        "valid_open": list(wrk_paths(keyring(), count, "open", "flood")),
        "forged_open": list(wrk_paths(forged, count, "open", "flood")),
        "forged_click": list(wrk_paths(forged, count, "click", "flood")),
        # No token shape at all: refused before any HMAC.
        "garbage": [
            "/o/" + "".join(rng.choices("ABCDabcd0123-_", k=80)) + ".gif" for _ in range(count)
        ],
    }
    files = {}
    for kind, lines in paths.items():
        files[kind] = work / f"flood-{kind}.txt"
        files[kind].write_text("".join(line + "\n" for line in lines))
    return files


def settled_puts(stack: st.Stack, quiet_s: float = 0.2, limit_s: float = 10.0) -> int:
    """beanstalkd's ``cmd-put`` once it has stopped moving: the events of requests
    still in ingest when wrk stopped (in the job linger, or in a put in flight) are
    put a few milliseconds later, and must count for the run that sent them."""
    deadline = time.monotonic() + limit_s
    last = int(stack.bs.stats()["cmd-put"])
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = int(stack.bs.stats()["cmd-put"])
        if now == last:
            break
        last = now
    return last


def bench_flood(work: Path, plan: Plan) -> dict[str, Any]:
    """Requests/s for invalid tokens against valid ones, wrk against the same ingest in
    interleaved rounds, with beanstalkd's ``cmd-put`` read around each run: a flood of
    invalid tokens must cost less than real traffic and never reach the queue."""
    stack = st.Stack.start(work, "flood")
    files = flood_urls(work, 20_000)
    try:
        ingest, at = st.start_ingest(stack)
        pid = ingest.proc.pid
        runs: dict[str, list[st.WrkResult]] = {kind: [] for kind in FLOOD_KINDS}
        cpu_us: dict[str, list[float]] = {kind: [] for kind in FLOOD_KINDS}
        puts: dict[str, int] = {kind: 0 for kind in FLOOD_KINDS}
        for _ in range(plan.ingest_rounds):
            for kind in FLOOD_KINDS:
                put_before, cpu_before = settled_puts(stack), cpu_seconds(pid)
                run = st.wrk(at, files[kind], plan.wrk_s)
                puts[kind] += settled_puts(stack) - put_before
                cpu_us[kind].append(
                    round((cpu_seconds(pid) - cpu_before) / max(run.requests, 1) * 1e6, 1)
                )
                runs[kind].append(run)
        ingest.stop()
        results: dict[str, Any] = {}
        for kind, kind_runs in runs.items():
            best = max(kind_runs, key=lambda r: r.requests_per_s)
            results[kind] = {**asdict(best), "runs_rps": [r.requests_per_s for r in kind_runs],
                             "cpu_us_per_request": min(cpu_us[kind]),
                             "beanstalkd_puts": puts[kind]}  # fmt: skip
        valid = results["valid_open"]
        results["vs_valid"] = {
            kind: {
                "requests_per_s": round(
                    results[kind]["requests_per_s"] / valid["requests_per_s"], 3
                ),
                "cpu_us_per_request": round(
                    results[kind]["cpu_us_per_request"] / valid["cpu_us_per_request"], 3
                ),
            }
            for kind in FLOOD_KINDS[1:]
        }
        return results
    finally:
        stack.close()


def bench_workers(work: Path, plan: Plan) -> dict[str, Any]:
    """``trackbuf ingest --workers 1`` against ``--workers 2`` (one shared socket), three
    interleaved rounds, and whether the shared /metrics counts every answer.

    wrk, beanstalkd and PostgreSQL share the same two cores, so the second worker can
    only take what they leave: the gain here is a floor, not what more cores give.
    """
    stack = st.Stack.start(work, "workers")
    urls = write_urls(work / "urls.txt", 20_000)
    try:
        procs: dict[int, tuple[st.Proc, str]] = {}
        for n in (1, 2):
            data = str(work / f"data-w{n}")  # each its own spool and metrics directory
            procs[n] = st.start_ingest(stack, f"ingest-w{n}", "--workers", str(n),
                                       TRACKBUF_DATA_DIR=data)  # fmt: skip
        runs: dict[int, list[st.WrkResult]] = {n: [] for n in procs}
        cpu_us: dict[int, list[float]] = {n: [] for n in procs}
        answered_by_wrk = {n: 0 for n in procs}
        for _ in range(plan.ingest_rounds):
            for n, (proc, at) in procs.items():
                before = cpu_seconds(proc.proc.pid)  # the supervisor and its workers
                run = st.wrk(at, urls, plan.wrk_s)
                after = cpu_seconds(proc.proc.pid)
                runs[n].append(run)
                answered_by_wrk[n] += run.requests
                cpu_us[n].append(round((after - before) / max(run.requests, 1) * 1e6, 1))
        # Every answer is counted once whichever process gave it; wrk does not count
        # the few answers still in flight when it stops, so allow one per connection.
        # Each process adds its tally to the shared files every TALLY_FLUSH_S: wait.
        time.sleep(TALLY_FLUSH_S + 0.5)
        counted = {n: scrape_total(proc.admin, "trackbuf_ingest_requests_total")
                   for n, (proc, _) in procs.items()}  # fmt: skip
        for proc, _ in procs.values():
            proc.stop()
        best = {n: max(r.requests_per_s for r in rs) for n, rs in runs.items()}
        return {
            "requests_per_s": {str(n): round(v) for n, v in best.items()},
            "runs_rps": {str(n): [r.requests_per_s for r in rs] for n, rs in runs.items()},
            "cpu_us_per_request": {str(n): min(v) for n, v in cpu_us.items()},
            "two_vs_one": round(best[2] / best[1], 3),
            "answered_by_wrk": {str(n): v for n, v in answered_by_wrk.items()},
            "counted_by_metrics": {str(n): round(v) for n, v in counted.items()},
            "metrics_match": all(0 <= counted[n] - answered_by_wrk[n] <= 3 * 64 for n in procs),
        }
    finally:
        stack.close()


FSYNC_MODES = {"-f 0": ("-f", "0"), "-f 50 (default)": (), "-F (never)": ("-F",)}


def bench_fsync(work: Path, plan: Plan) -> dict[str, Any]:
    """What power-loss safety costs ingest: one beanstalkd (binlog on) per fsync setting,
    one ingest on each, wrk against them in interleaved rounds. Ingest puts
    micro-batches, so one fsync covers a batch of events."""
    stack = st.Stack.start(work, "fsync")
    urls = write_urls(work / "urls.txt", 20_000)
    servers: list[Beanstalkd] = []
    try:
        ingests: dict[str, tuple[st.Proc, str]] = {}
        for i, (mode, flags) in enumerate(FSYNC_MODES.items()):
            server = Beanstalkd(work / f"binlog-{i}", *flags).start()
            servers.append(server)
            ingests[mode] = st.start_ingest(stack, f"ingest-fsync-{i}",
                                            TRACKBUF_BEANSTALKD=server.address,
                                            TRACKBUF_DATA_DIR=str(work / f"data-{i}"))  # fmt: skip
        runs: dict[str, list[st.WrkResult]] = {mode: [] for mode in ingests}
        for _ in range(plan.ingest_rounds):
            for mode, (_, at) in ingests.items():
                runs[mode].append(st.wrk(at, urls, plan.wrk_s))
        out: dict[str, Any] = {}
        for mode, (proc, _) in ingests.items():
            samples = scrape(proc.admin)
            jobs = samples.get("trackbuf_ingest_job_events_count", 0.0)
            best = max(runs[mode], key=lambda r: r.requests_per_s)
            out[mode] = {**asdict(best), "runs_rps": [r.requests_per_s for r in runs[mode]],
                         "events_per_job": round(samples.get("trackbuf_ingest_job_events_sum",
                                                             0.0) / max(jobs, 1), 1)}  # fmt: skip
            proc.stop()
        # The other side of the binlog: every delete is a record too, fsynced with -f 0.
        # Jobs of one event each (what ingest puts at low traffic) are the worst case.
        for i, (mode, flags) in enumerate(FSYNC_MODES.items()):
            queue = Beanstalkd(work / f"drain-binlog-{i}", *flags).start()
            servers.append(queue)
            stack.sql("TRUNCATE events")
            fill(queue, make_jobs(plan.fsync_drain_jobs, f"fsync{i}", events_per_job=1))
            seconds = timed_drain(stack, queue, 4, plan.fsync_drain_jobs, f"drain-fsync-{i}")
            out[mode]["drain_one_event_jobs_per_s"] = round(plan.fsync_drain_jobs / seconds)
        return out
    finally:
        for server in servers:
            server.kill()
        stack.close()


def scrape_total(listen: str, name: str) -> float:
    """The sum of every sample of one metric on an ingest's /metrics."""
    return sum(v for key, v in scrape(listen).items() if key.split("{", 1)[0] == name)


# Drain ----------------------------------------------------------------------------


async def copy_ceilings(dsn: str, count: int) -> dict[str, float]:
    """Rows built in Python first (not timed), then COPY in 1000-row batches."""
    rows = [
        (e.event_id, e.kind, e.occurred_at, e.campaign, e.recipient, e.url, e.user_agent,
         e.ip)
        for e in (new_event("open", "copy", f"r{i}", user_agent="Mozilla/5.0", ip="203.0.113.7")
                  for i in range(count))
    ]  # fmt: skip
    conn = await asyncpg.connect(dsn)
    out = {}
    try:
        await conn.execute("TRUNCATE events")
        started = time.perf_counter()
        for i in range(0, count, 1000):
            await conn.copy_records_to_table("events", records=rows[i : i + 1000], columns=COLUMNS)
        out["raw_copy"] = count / (time.perf_counter() - started)
        await conn.execute("TRUNCATE events")
        await conn.execute("CREATE TEMP TABLE staging (LIKE events INCLUDING DEFAULTS)")
        started = time.perf_counter()
        for i in range(0, count, 1000):
            async with conn.transaction():
                await conn.copy_records_to_table("staging", records=rows[i : i + 1000],
                                                 columns=COLUMNS)  # fmt: skip
                await conn.execute(
                    "INSERT INTO events SELECT * FROM staging"
                    " ON CONFLICT (event_id, occurred_at) DO NOTHING"
                )
                await conn.execute("TRUNCATE staging")
        out["copy_staging_on_conflict"] = count / (time.perf_counter() - started)
        await conn.execute("TRUNCATE events")
    finally:
        await conn.close()
    return out


def timed_drain(
    stack: st.Stack, queue: Beanstalkd, threads: int, expected: int, name: str
) -> float:
    """Seconds from releasing a full queue to a running consumer until it is empty.

    The tube is paused while the consumer starts, so its start-up (imports, connections)
    is not counted: the COPY ceilings it is compared with are timed without theirs.
    A job is deleted only after its batch committed, so an empty queue (nothing ready,
    nothing reserved) means every event is stored.
    """
    listen = f"127.0.0.1:{free_port()}"
    with queue.client() as client:
        client.pause_tube(st.TUBE, 3600)
    proc = stack.trackbuf(name, "consume", "--threads", str(threads),
                          TRACKBUF_METRICS_LISTEN=listen,
                          TRACKBUF_BEANSTALKD=queue.address)  # fmt: skip
    try:
        wait_http(f"http://{listen}/readyz", [proc.proc])  # connected to the database
        with queue.client() as client:
            started = time.perf_counter()
            client.pause_tube(st.TUBE, 0)  # beanstalkd hands out jobs at once
            while True:
                stats = client.stats_tube(st.TUBE)
                if stats["current-jobs-ready"] == 0 and stats["current-jobs-reserved"] == 0:
                    break
                time.sleep(0.005)
            elapsed = time.perf_counter() - started
    finally:
        code = proc.stop()
    stored = stack.rows()
    if code != 0 or stored != expected:
        raise RuntimeError(f"drain with {threads} threads: exit {code}, {stored}/{expected} rows")
    return elapsed


# beanstalkd writes a binlog record for every delete too; with -f 0 it fsyncs each one
# before answering, so the drain is bounded by the disk's fsync rate times the events per
# job. The consumer is measured against both settings.
DRAIN_QUEUES = {"-f 0": ("-f", "0"), "-f 50": ()}


def bench_drain(work: Path, plan: Plan) -> dict[str, Any]:
    stack = st.Stack.start(work, "drain")
    queues = {mode: Beanstalkd(work / f"queue{i}", *flags).start()
              for i, (mode, flags) in enumerate(DRAIN_QUEUES.items())}  # fmt: skip
    try:
        runs: dict[str, list[float]] = {}
        # Rounds interleave the ceilings and the consumer, so drift hits both alike.
        for round_ in range(plan.drain_rounds):
            for key, value in asyncio.run(copy_ceilings(stack.dsn, plan.drain_events)).items():
                runs.setdefault(key, []).append(round(value))
            for mode, queue in queues.items():
                for threads in plan.thread_counts:
                    stack.sql("TRUNCATE events")
                    fill(queue, make_jobs(plan.drain_events, f"t{threads}r{round_}"))
                    seconds = timed_drain(stack, queue, threads, plan.drain_events,
                                          f"drain-{threads}")  # fmt: skip
                    runs.setdefault(f"{mode} {threads}", []).append(
                        round(plan.drain_events / seconds)
                    )
        ceilings = {key: max(runs[key]) for key in ("raw_copy", "copy_staging_on_conflict")}
        consumer = {mode: {str(t): max(runs[f"{mode} {t}"]) for t in plan.thread_counts}
                    for mode in queues}  # fmt: skip
        best = {mode: max(by_threads.values()) for mode, by_threads in consumer.items()}
        return {
            "events": plan.drain_events,
            "events_per_job": EVENTS_PER_JOB,
            "rounds": plan.drain_rounds,
            "runs": runs,
            "ceilings_rows_per_s": ceilings,
            "consumer_events_per_s": consumer,
            "best_vs_copy_staging": {
                mode: round(v / ceilings["copy_staging_on_conflict"], 3) for mode, v in best.items()
            },
            "best_vs_raw_copy": {
                mode: round(v / ceilings["raw_copy"], 3) for mode, v in best.items()
            },
        }
    finally:
        for queue in queues.values():
            queue.kill()
        stack.close()


# Backlog ----------------------------------------------------------------------------


def bench_backlog(work: Path, plan: Plan) -> dict[str, Any]:
    stack = st.Stack.start(work, "backlog")
    try:
        empty_rss = stack.bs.rss_bytes()
        stack.pg.stop()
        jobs = make_jobs(plan.backlog_events, "backlog")
        fill(stack.bs, jobs)
        full_rss = stack.bs.rss_bytes()
        proc = stack.trackbuf("backlog-consumer", "consume", "--burst", "--threads", "4",
                              TRACKBUF_METRICS_LISTEN=f"127.0.0.1:{free_port()}")  # fmt: skip
        time.sleep(1)  # the consumer is up and waiting for the database
        started = time.perf_counter()
        stack.pg.start()
        code = proc.proc.wait(3600)
        seconds = time.perf_counter() - started
        stored = stack.rows()
        return {
            "events": plan.backlog_events,
            "jobs": len(jobs),
            "drain_s": round(seconds, 2),
            "events_per_s": round(plan.backlog_events / seconds),
            "stored": stored,
            "exit_code": code,
            "beanstalkd_rss_empty_mb": round(empty_rss / 2**20, 1),
            "beanstalkd_rss_full_mb": round(full_rss / 2**20, 1),
            "beanstalkd_mb_per_million_events": round(
                (full_rss - empty_rss) / 2**20 / plan.backlog_events * 1e6, 1
            ),
        }
    finally:
        stack.close()


def bench_memory(work: Path, plan: Plan) -> dict[str, Any]:
    """Consumer RSS after each of many fill-and-drain cycles of 200,000 fresh events: a
    leak grows with the events handled, allocator noise does not."""
    stack = st.Stack.start(work, "memory")
    try:
        proc, _ = st.start_consumer(stack, "memory-consumer")
        samples = []
        for cycle in range(plan.memory_cycles):
            fill(stack.bs, make_jobs(plan.memory_events, f"m{cycle}"))
            while True:
                stats = stack.bs.tube_stats()
                if stats["current-jobs-ready"] == 0 and stats["current-jobs-reserved"] == 0:
                    break
                time.sleep(0.05)
            stack.sql("TRUNCATE events")  # keeps PostgreSQL's work the same every cycle
            samples.append(round(proc.rss_bytes() / 2**20, 2))
        proc.stop()
        half = len(samples) // 2
        return {
            "events": plan.memory_cycles * plan.memory_events,
            "events_per_cycle": plan.memory_events,
            "rss_mb": samples,
            "first_half_max_mb": max(samples[:half] or samples),
            "second_half_max_mb": max(samples[half:]),
        }
    finally:
        stack.close()


# End-to-end latency and the spike ------------------------------------------------------


def scrape(listen: str) -> dict[str, float]:
    """Every sample on a /metrics page, keyed the way the page writes it:
    ``name{label="value",...}`` with the labels sorted, or just ``name``."""
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample_key(sample): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample_key(sample: Sample) -> str:
    if not sample.labels:
        return sample.name
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
    return f"{sample.name}{{{labels}}}"


def histogram_quantile(q: float, before: dict[str, float], after: dict[str, float],
                       name: str) -> float:  # fmt: skip
    """Prometheus-style quantile over the bucket increments between two scrapes."""
    buckets = []
    for key, value in after.items():
        if key.startswith(name + "_bucket{le="):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets.append((bound, value - before.get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if not total:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return lower


def bench_e2e(work: Path, plan: Plan) -> dict[str, Any]:
    """A steady rate from wrk (paced per connection; a Python client cannot produce
    5,000 requests/s on two shared cores), latency from the consumer's histogram, and
    the RSS of ingest and consumer every 10 s to show they stay flat."""
    stack = st.Stack.start(work, "e2e")
    urls = write_urls(work / "urls.txt", 50_000)
    try:
        ingest, ingest_at = st.start_ingest(stack)
        consumer, metrics_at = st.start_consumer(stack)
        before = scrape(metrics_at)
        rss: dict[str, list[float]] = {"ingest": [], "consumer": []}
        connections = 128
        # wrk's rate is connections / (delay + latency): guess the latency, measure it
        # in a short probe at that pace, then set the delay that gives the target rate.
        delay_ms = max(connections * 1000 / plan.e2e_rate - 2, 0)
        probe = st.wrk(ingest_at, urls, 5, connections=connections, delay_ms=delay_ms)
        latency_ms = connections * 1000 / max(probe.requests_per_s, 1) - delay_ms
        delay_ms = max(connections * 1000 / plan.e2e_rate - latency_ms, 0)
        before = scrape(metrics_at)
        outcome: dict[str, st.WrkResult] = {}
        load = threading.Thread(
            target=lambda: outcome.update(
                r=st.wrk(ingest_at, urls, plan.e2e_s, connections=connections, delay_ms=delay_ms)
            )
        )
        load.start()
        while load.is_alive():
            rss["ingest"].append(round(ingest.rss_bytes() / 2**20, 1))
            rss["consumer"].append(round(consumer.rss_bytes() / 2**20, 1))
            load.join(10)
        sent = outcome["r"]
        time.sleep(2)  # the last batches' linger
        after = scrape(metrics_at)
        name = "trackbuf_consumer_end_to_end_latency_seconds"
        consumer.stop()
        ingest.stop()
        return {
            "target_rate": plan.e2e_rate,
            "duration_s": plan.e2e_s,
            "client": asdict(sent),
            "stored": stack.rows(),
            "e2e_p50_s": round(histogram_quantile(0.5, before, after, name), 3),
            "e2e_p99_s": round(histogram_quantile(0.99, before, after, name), 3),
            "rss_mb": rss,
        }
    finally:
        stack.close()


def bench_spike(work: Path, plan: Plan) -> dict[str, Any]:
    """Steady traffic with PostgreSQL stopped for the middle third: a flat ingest, a
    queue that rises and drains to zero, nothing lost."""
    stack = st.Stack.start(work, "spike")
    try:
        ingest, ingest_at = st.start_ingest(stack)
        consumer, _ = st.start_consumer(stack)
        series: list[dict[str, float]] = []
        down_at, up_at = plan.spike_s / 3, 2 * plan.spike_s / 3
        state = {"down": False, "up": False}

        def tick(t: float) -> None:
            if t >= down_at and not state["down"]:
                state["down"] = True
                threading.Thread(target=stack.pg.stop).start()
            if t >= up_at and not state["up"]:
                state["up"] = True
                threading.Thread(target=stack.pg.start).start()
            series.append(
                {"t": round(t, 1), "ready_jobs": stack.bs.tube_stats()["current-jobs-ready"]}
            )

        traffic = drive(f"http://{ingest_at}", keyring(), "spike", rate=plan.spike_rate,
                        duration_s=plan.spike_s, concurrency=128, on_tick=tick)  # fmt: skip
        result = asyncio.run(traffic)
        drained_at = None
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            ready = stack.bs.tube_stats()["current-jobs-ready"]
            series.append(
                {"t": round(plan.spike_s + time.monotonic() - t0, 1), "ready_jobs": ready}
            )
            if ready == 0 and stack.rows() >= len(result.acked):
                drained_at = plan.spike_s + time.monotonic() - t0
                break
            time.sleep(0.5)
        stored = {str(r) for r in asyncio.run(_recipients(stack.dsn, "spike"))}
        acked = set(result.acked)
        consumer.stop()
        ingest.stop()
        return {
            "duration_s": plan.spike_s,
            "database_down_s": [round(down_at, 1), round(up_at, 1)],
            "client": result.summary(),
            "lost": len(acked - stored),
            "stored": len(stored),
            "drained_at_s": None if drained_at is None else round(drained_at, 1),
            "per_second": result.per_second,
            "p99_per_second_ms": {k: round(v * 1000, 2) for k, v in result.p99_per_second.items()},
            "queue": series,
        }
    finally:
        stack.close()


async def _recipients(dsn: str, prefix: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT recipient FROM events WHERE recipient LIKE $1", prefix + "-%"
        )
        return [row["recipient"] for row in rows]
    finally:
        await conn.close()


def bench_scaling(work: Path, plan: Plan) -> dict[str, Any]:
    return scaling.bench_scaling(work, plan.ingest_rounds, plan.wrk_s, plan.drain_events)


def bench_report(work: Path, plan: Plan) -> dict[str, Any]:
    return analytics.bench_stats(work, plan.report_events)


def bench_cost(work: Path, plan: Plan) -> dict[str, Any]:
    return cost.bench_cost(
        work, plan.cost_rate, plan.cost_s, plan.smooth_rate, plan.smooth_s, plan.smooth_rounds
    )


def bench_idle(work: Path, plan: Plan) -> dict[str, Any]:
    return cost.measure_idle(work, plan.idle_s)


SECTIONS = {
    "ingest": bench_ingest,
    "workers": bench_workers,
    "flood": bench_flood,
    "fsync": bench_fsync,
    "drain": bench_drain,
    "backlog": bench_backlog,
    "memory": bench_memory,
    "e2e": bench_e2e,
    "spike": bench_spike,
    "report": bench_report,
    "scaling": bench_scaling,
    "cost": bench_cost,
    "idle": bench_idle,
}
