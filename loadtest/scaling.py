"""The scaling section: what a pool of beanstalkd servers and more processes buy.

Two measurements, each over every combination, in interleaved rounds so drift in the
machine's speed hits all alike:

- ingest: wrk against ``trackbuf ingest --workers 1|2`` putting into a pool of 1 or 3
  beanstalkd servers: requests/s, and the CPU each part spent per request;
- drain: ``trackbuf consume`` in 1 or 2 processes (4 threads each) emptying the same
  number of events spread over 1 or 3 servers: events/s, and CPU per event of the
  consumer, beanstalkd and PostgreSQL's backends.

This machine has two cores shared by wrk, every server and the processes measured, so
the ratios here show what each part costs and whether adding one *can* help, not what
more cores give; docs/SCALING.md turns the CPU per event into a capacity model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from loadtest import stack as st
from loadtest.servers import Beanstalkd, cpu_seconds, free_port
from loadtest.workload import make_jobs, write_urls
from trackbuf.httpwait import wait_http

SERVERS = (1, 3)
PROCESSES = (1, 2)
CONSUMER_THREADS = 4
# The drain has a tube of its own: the ingest rounds fill the default one.
DRAIN_TUBE = "scaling-drain"
DRAIN_TIMEOUT_S = 600


def _pool(queues: list[Beanstalkd]) -> str:
    return ",".join(q.address for q in queues)


def _queue_cpu(queues: list[Beanstalkd]) -> float:
    return sum(cpu_seconds(q.proc.pid) for q in queues if q.proc is not None)


def _drained(queues: list[Beanstalkd]) -> bool:
    for q in queues:
        stats = q.tube_stats(DRAIN_TUBE)
        if stats["current-jobs-ready"] or stats["current-jobs-reserved"]:
            return False
    return True


def ingest_round(stack: st.Stack, queues: list[Beanstalkd], workers: int, urls: Path,
                 seconds: float) -> dict[str, float]:  # fmt: skip
    """One wrk run against an ingest over this pool; CPU per request of each part."""
    data = stack.work / f"data-i{len(queues)}w{workers}-{time.monotonic_ns()}"
    proc, at = st.start_ingest(stack, f"ingest-{len(queues)}-{workers}", "--workers",
                               str(workers), TRACKBUF_BEANSTALKD=_pool(queues),
                               TRACKBUF_DATA_DIR=str(data))  # fmt: skip
    try:
        before = cpu_seconds(proc.proc.pid), _queue_cpu(queues)
        run = st.wrk(at, urls, seconds)
        after = cpu_seconds(proc.proc.pid), _queue_cpu(queues)
    finally:
        proc.stop()
    answered = max(run.requests, 1)
    return {
        "requests_per_s": run.requests_per_s,
        "p99_ms": run.p99_ms,
        "errors": run.errors + run.non_2xx_3xx,
        "ingest_cpu_us": round((after[0] - before[0]) / answered * 1e6, 1),
        "beanstalkd_cpu_us": round((after[1] - before[1]) / answered * 1e6, 1),
    }


def drain_round(stack: st.Stack, queues: list[Beanstalkd], consumers: int, events: int,
                jobs: list[bytes]) -> dict[str, float]:  # fmt: skip
    """Fill the pool evenly (tubes paused), start the consumers, time until empty."""
    stack.sql("TRUNCATE events")
    for i, queue in enumerate(queues):
        with queue.client(DRAIN_TUBE) as client:
            client.pause_tube(DRAIN_TUBE, 3600)
            for body in jobs[i :: len(queues)]:
                client.put(body, ttr=600)
    procs = []
    try:
        for n in range(consumers):
            listen = f"127.0.0.1:{free_port()}"
            proc = stack.trackbuf(f"consume-{len(queues)}-{consumers}-{n}", "consume",
                                  "--threads", str(CONSUMER_THREADS),
                                  TRACKBUF_METRICS_LISTEN=listen, TRACKBUF_TUBE=DRAIN_TUBE,
                                  TRACKBUF_BEANSTALKD=_pool(queues))  # fmt: skip
            procs.append(proc)
            wait_http(f"http://{listen}/readyz", [proc.proc])
        pids = [p.proc.pid for p in procs]
        before = (sum(cpu_seconds(p) for p in pids), _queue_cpu(queues),
                  cpu_seconds(stack.pg.pid))  # fmt: skip
        started = time.perf_counter()
        for queue in queues:
            with queue.client(DRAIN_TUBE) as client:
                client.pause_tube(DRAIN_TUBE, 0)
        while not _drained(queues):
            if time.perf_counter() - started > DRAIN_TIMEOUT_S:
                raise RuntimeError(f"scaling drain: not empty after {DRAIN_TIMEOUT_S} s")
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        after = (sum(cpu_seconds(p) for p in pids), _queue_cpu(queues),
                 cpu_seconds(stack.pg.pid))  # fmt: skip
    finally:
        codes = [p.stop() for p in procs]
    stored = stack.rows()
    if any(codes) or stored != events:
        raise RuntimeError(f"scaling drain: exits {codes}, {stored}/{events} rows")
    per_event = 1e6 / events
    return {
        "events_per_s": round(events / elapsed),
        "consumer_cpu_us": round((after[0] - before[0]) * per_event, 1),
        "beanstalkd_cpu_us": round((after[1] - before[1]) * per_event, 1),
        "postgres_cpu_us": round((after[2] - before[2]) * per_event, 1),
    }


def bench_scaling(work: Path, rounds: int, wrk_s: float, events: int) -> dict[str, Any]:
    stack = st.Stack.start(work, "scaling")
    queues = [Beanstalkd(work / f"pool{i}", "-f", "0").start() for i in range(max(SERVERS))]
    urls = write_urls(work / "urls.txt", 20_000)
    jobs = make_jobs(events, "scale")
    ingest: dict[str, list[dict[str, float]]] = {}
    drain: dict[str, list[dict[str, float]]] = {}
    try:
        for _ in range(rounds):
            for servers in SERVERS:
                for n in PROCESSES:
                    key = f"{servers} beanstalkd, {n} process(es)"
                    ingest.setdefault(key, []).append(
                        ingest_round(stack, queues[:servers], n, urls, wrk_s)
                    )
                    drain.setdefault(key, []).append(
                        drain_round(stack, queues[:servers], n, events, jobs)
                    )
    finally:
        for queue in queues:
            queue.kill()
        stack.close()
    best_ingest = {k: max(v, key=lambda r: r["requests_per_s"]) for k, v in ingest.items()}
    best_drain = {k: max(v, key=lambda r: r["events_per_s"]) for k, v in drain.items()}
    base = f"{SERVERS[0]} beanstalkd, {PROCESSES[0]} process(es)"
    ingest_base, drain_base = best_ingest[base]["requests_per_s"], best_drain[base]["events_per_s"]
    return {
        "rounds": rounds,
        "drain_events": events,
        "consumer_threads_per_process": CONSUMER_THREADS,
        "ingest": best_ingest,
        "drain": best_drain,
        "ingest_vs_base": {
            k: round(v["requests_per_s"] / ingest_base, 3) for k, v in best_ingest.items()
        },
        "drain_vs_base": {
            k: round(v["events_per_s"] / drain_base, 3) for k, v in best_drain.items()
        },
        "runs": {"ingest": ingest, "drain": drain},
    }
