"""What storing a million events costs in CPU, every process counted.

trackbuf at a fixed, paced rate (wrk, a realistic mix of opens, repeat opens and
clicks from real mail clients' user agents), then the naive tracker (one INSERT per
request) at the same rate against its own fresh PostgreSQL, and a bare aiohttp
handler. Then trackbuf and the bare handler again under smooth traffic
(``loadtest/smooth.py``: every request at its own Poisson moment), where wrk's
connections fall into step and arrive in bursts. For every process the CPU seconds
(utime + stime from /proc) between the first request and the moment the last event is
stored, divided by the rows stored (the bare handler: by the requests answered):

- trackbuf: the ingest process (and any workers), beanstalkd, the consumer;
- naive: its one process;
- both: PostgreSQL's backends (the connections doing the inserts) and PostgreSQL's
  background (postmaster, checkpointer, walwriter, background writer, autovacuum, and
  every child that exited during the run: the kernel adds those to the postmaster).

Idle work inside the window (timers, polling, the wait for the last batch) is counted:
it is part of what running the pipeline costs. The client (wrk) is not.
"""

from __future__ import annotations

import os
import random
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest import smooth
from loadtest import stack as st
from loadtest.servers import Beanstalkd, cpu_seconds, free_port, wait_port
from loadtest.traffic import USER_AGENTS
from trackbuf import links
from trackbuf import metric_names as names
from trackbuf.tokens import Keyring

# Titles PostgreSQL gives its own processes (``postgres: checkpointer`` ...); any other
# child is a backend serving a connection.
PG_BACKGROUND = ("checkpointer", "background writer", "walwriter", "autovacuum",
                 "logical replication", "logger", "archiver", "stats", "startup")  # fmt: skip
CLICK_SHARE = 0.2  # of recipients who open, the share who also click
# One wrk connection per 10 events/s, each sending every ~100 ms: a wait long next to
# the answer time, so a slow answer (the cores are shared) lowers the rate only a little.
CONNECTIONS_PER_RATE = 10


def traffic_lines(keyring: Keyring, count: int, run: str, seed: int = 7) -> Iterator[str]:
    """``count`` lines of ``path<TAB>user agent`` for loadtest/wrk/urls.lua.

    A recipient opens once, often again (image proxies refetch, people reread: the
    number of opens is geometric, mean 2), and one in five also clicks, sometimes
    twice. The lines are shuffled, so a repeat can come before or long after the first.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    recipient = 0
    while len(lines) < count:
        campaign = f"{run}-c{rng.randrange(40)}"
        address = f"{run}-{recipient}@example.com"
        agent = rng.choice(USER_AGENTS)  # one mail client or proxy per recipient
        recipient += 1
        opens = 1
        while rng.random() < 0.5:
            opens += 1
        path = links.open_url(_NO_HOST, keyring, campaign, address).removeprefix(_NO_HOST)
        lines += [f"{path}\t{agent}"] * opens
        if rng.random() < CLICK_SHARE:
            target = f"https://shop.example.com/p/{rng.randrange(500)}?utm_campaign={campaign}"
            url = links.click_url(_NO_HOST, keyring, campaign, address, target)
            lines += [f"{url.removeprefix(_NO_HOST)}\t{agent}"] * (1 + (rng.random() < 0.2))
    rng.shuffle(lines)
    yield from lines[:count]


_NO_HOST = "http://x"


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces and parentheses: split after the last ")".
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def run_time(pid: int) -> float:
    """Seconds a single-threaded process has run, to the nanosecond (schedstat): the
    background processes use a few milliseconds in a short run, less than the 10 ms
    ticks utime and stime count in."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def postgres_cpu(postmaster: int) -> dict[str, float]:
    """CPU seconds of PostgreSQL so far: its backends, and its background processes
    (every PostgreSQL process is single-threaded, so schedstat covers all its time).

    The postmaster's cutime/cstime hold the CPU of every child it has reaped, so a
    backend or autovacuum worker that exits between two readings is not lost; it is
    counted as background (the pools measured here keep their connections open).
    """
    fields = _stat(postmaster)
    if fields is None:
        raise RuntimeError(f"PostgreSQL (postmaster {postmaster}) is not running")
    reaped = (int(fields[13]) + int(fields[14])) / _TICK  # cutime + cstime
    background = run_time(postmaster) + reaped
    backends = 0.0
    for child in _children(postmaster):
        try:
            title = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if any(name in title for name in PG_BACKGROUND):
            background += run_time(child)
        else:
            backends += run_time(child)
    return {"backends": backends, "background": background}


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def postmaster_pid(stack: st.Stack) -> int:
    return int((stack.pg.datadir / "postmaster.pid").read_text().splitlines()[0])


def cpu_by_part(pids: dict[str, int], stack: st.Stack) -> dict[str, float]:
    """One reading of every part's CPU seconds."""
    parts = {name: cpu_seconds(pid) for name, pid in pids.items()}  # with any children
    pg = postgres_cpu(postmaster_pid(stack))
    parts["postgresql_backends"] = pg["backends"]
    parts["postgresql_background"] = pg["background"]
    return parts


def paced(at: str, urls: Path, rate: float, seconds: float) -> st.WrkResult:
    """wrk at about ``rate`` requests/s: each connection waits ~100 ms before every
    request (Debian's wrk has no ``-R``), so the answer time slows it down a little."""
    connections = max(2, round(rate / CONNECTIONS_PER_RATE))
    delay_ms = connections * 1000 / rate
    return st.wrk(at, urls, seconds, connections=connections, delay_ms=delay_ms)


def wait_drained(stack: st.Stack, timeout: float = 300) -> None:
    """Until beanstalkd holds no job the consumer has yet to store (or timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tube = stack.bs.tube_stats()
        pending = tube["current-jobs-ready"] + tube["current-jobs-reserved"]
        if pending == 0 and tube["current-jobs-delayed"] == 0:
            return
        time.sleep(0.2)
    raise TimeoutError("the consumer did not drain the queue")


def ingest_figures(admin: str) -> tuple[int, float]:
    """From one read of ingest's /metrics: the events it answered after they were durable
    (queued in beanstalkd or spooled), and the mean events per job it put (its job-size
    histogram)."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    acked = 0.0
    job = {"_sum": 0.0, "_count": 0.0}
    for line in text.splitlines():
        if line.startswith(names.INGEST_EVENTS + "_total{") and (
            'outcome="queued"' in line or 'outcome="spooled"' in line
        ):
            acked += float(line.rsplit(" ", 1)[1])
        for suffix in job:
            if line.startswith(names.INGEST_JOB_EVENTS + suffix):
                job[suffix] += float(line.rsplit(" ", 1)[1])
    return round(acked), round(job["_sum"] / max(job["_count"], 1), 2)


def per_million(cpu: dict[str, float], stored: int, rate: float) -> dict[str, Any]:
    parts = {name: round(seconds / max(stored, 1) * 1e6, 1) for name, seconds in cpu.items()}
    total = sum(cpu.values()) / max(stored, 1)
    return {
        "cpu_s_per_million": parts,
        "total_cpu_s_per_million": round(total * 1e6, 1),
        # CPU seconds per second at that rate: the cores it keeps busy.
        "cores_at_10k_per_s": round(total * 10_000, 2),
        "cores_at_measured_rate": round(total * rate, 2),
    }


def drive(driver: str, at: str, urls: Path, rate: float, seconds: float) -> dict[str, Any]:
    """Send the traffic in ``urls`` at ``rate`` for ``seconds``: wrk's paced
    connections, or every request at its own moment (``smooth``)."""
    if driver == "wrk":
        return asdict(paced(at, urls, rate, seconds))
    lines = urls.read_text().splitlines()
    return asdict(smooth.run(at, lines, rate, seconds, connections=SMOOTH_CONNECTIONS))


# Keep-alive clients of the smooth driver: enough that one is nearly always free.
SMOOTH_CONNECTIONS = 64


def reserve_counts(stack: st.Stack) -> tuple[int, int]:
    """beanstalkd's own count of reserve commands received and jobs put."""
    stats = stack.bs.stats()
    return stats["cmd-reserve"] + stats["cmd-reserve-with-timeout"], stats["total-jobs"]


def measure_trackbuf(
    work: Path, urls: Path, rate: float, seconds: float, driver: str = "wrk", **ingest_env: str
) -> dict[str, Any]:
    stack = st.Stack.start(work, "cost-trackbuf")
    try:
        ingest, at = st.start_ingest(stack, **ingest_env)
        consumer, _ = st.start_consumer(stack)
        assert stack.bs.proc is not None
        pids = {"ingest": ingest.proc.pid, "beanstalkd": stack.bs.proc.pid,
                "consumer": consumer.proc.pid}  # fmt: skip
        time.sleep(1)  # both settled: startup is not part of the cost
        before, started = cpu_by_part(pids, stack), time.monotonic()
        reserves_before, jobs_before = reserve_counts(stack)
        run = drive(driver, at, urls, rate, seconds)
        time.sleep(1)  # requests wrk gave up on at its end are still being answered
        wait_drained(stack)
        after, window = cpu_by_part(pids, stack), time.monotonic() - started
        reserves_after, jobs_after = reserve_counts(stack)
        reserves, jobs = reserves_after - reserves_before, jobs_after - jobs_before
        acked, per_job = ingest_figures(ingest.admin)
        consumer.stop()
        ingest.stop()
        stored = stack.rows()
        cpu = {name: after[name] - before[name] for name in after}
        return {"driver": driver, "client": run, "window_s": round(window, 1),
                "acknowledged": acked, "stored": stored, "events_per_job": per_job,
                "jobs": jobs, "reserve_commands": reserves,
                "reserves_per_job": round(reserves / max(jobs, 1), 2),
                "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
                **per_million(cpu, stored, run["requests_per_s"])}  # fmt: skip
    finally:
        stack.close()


def measure_bare(
    work: Path, urls: Path, rate: float, seconds: float, driver: str
) -> dict[str, Any]:
    """A bare aiohttp pixel handler (``loadtest/baselines.py``) under the same driver
    and rate: its CPU per request answered is the floor any aiohttp tracker starts
    from (its clicks answer a fixed redirect)."""
    work.mkdir(parents=True, exist_ok=True)
    listen = f"127.0.0.1:{free_port()}"
    proc = st.Proc([sys.executable, "-m", "loadtest.baselines", "bare", "--listen", listen],
                   work / "bare.log")  # fmt: skip
    try:
        wait_port(int(listen.rsplit(":", 1)[1]), proc=proc.proc)
        time.sleep(1)
        before = cpu_seconds(proc.proc.pid)
        run = drive(driver, listen, urls, rate, seconds)
        cpu = cpu_seconds(proc.proc.pid) - before
    finally:
        proc.stop()
    return {"driver": driver, "client": run, "cpu_s": round(cpu, 2),
            "cpu_us_per_request": round(cpu / max(run["requests"], 1) * 1e6, 1)}  # fmt: skip


def measure_naive(work: Path, urls: Path, rate: float, seconds: float) -> dict[str, Any]:
    stack = st.Stack.start(work, "cost-naive")
    try:
        naive, at = st.start_baseline(stack, "naive")
        pids = {"naive_tracker": naive.proc.pid}
        time.sleep(1)
        before, started = cpu_by_part(pids, stack), time.monotonic()
        run = paced(at, urls, rate, seconds)
        time.sleep(1)  # the INSERTs of requests still in flight when wrk stopped
        after, window = cpu_by_part(pids, stack), time.monotonic() - started
        naive.stop()
        stored = stack.rows()
        cpu = {name: after[name] - before[name] for name in after}
        # Every answer came after its INSERT, so stored >= answered; the excess is the
        # requests in flight when wrk stopped (at most one per connection).
        return {"client": asdict(run), "window_s": round(window, 1),
                "acknowledged": run.requests, "stored": stored,
                "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
                **per_million(cpu, stored, run.requests_per_s)}  # fmt: skip
    finally:
        stack.close()


def bench_cost(
    work: Path,
    rate: float,
    seconds: float,
    smooth_rate: float,
    smooth_s: float,
    smooth_rounds: int = 2,
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    urls = work / "cost-urls.txt"
    # As many lines as requests, so repeats are the mix's own, not wrk cycling the file.
    count = max(int(rate * seconds * 1.1), 1000)
    urls.write_text("".join(line + "\n" for line in traffic_lines(st_keyring(), count, "cost")))
    load_before = [round(v, 2) for v in os.getloadavg()]
    trackbuf = measure_trackbuf(work / "trackbuf", urls, rate, seconds)
    # The design before the fast path and the linger (aiohttp answers every request,
    # every job is put at once): what the two save, measured in the same run.
    before = measure_trackbuf(
        work / "trackbuf-before", urls, rate, seconds,
        TRACKBUF_FAST_PATH="0", TRACKBUF_JOB_LINGER_MS="0",
    )  # fmt: skip
    naive = measure_naive(work / "naive", urls, rate, seconds)
    bare = measure_bare(work / "bare", urls, rate, seconds, "wrk")
    # Smooth traffic: the same mix, every request at its own moment.
    smooth_urls = work / "smooth-urls.txt"
    count = max(int(smooth_rate * smooth_s * 1.1), 1000)
    smooth_urls.write_text(
        "".join(line + "\n" for line in traffic_lines(st_keyring(), count, "smooth"))
    )
    # The ratio of two runs minutes apart moves with whatever else the shared cores do,
    # so the bare handler and the pipeline alternate, and each keeps its best round.
    bare_rounds, trackbuf_rounds = [], []
    for round_ in range(smooth_rounds):
        here = work / f"smooth-{round_}"
        bare_rounds.append(measure_bare(here / "bare", smooth_urls, smooth_rate, smooth_s,
                                        "smooth"))  # fmt: skip
        trackbuf_rounds.append(measure_trackbuf(here / "trackbuf", smooth_urls, smooth_rate,
                                                smooth_s, driver="smooth"))  # fmt: skip
    smooth_bare = min(bare_rounds, key=lambda r: float(r["cpu_us_per_request"]))
    smooth_trackbuf = min(trackbuf_rounds, key=lambda r: float(r["total_cpu_s_per_million"]))
    return {
        "target_rate": rate,
        "load_average_before": load_before,
        "duration_s": seconds,
        "mix": {"click_share_of_recipients": CLICK_SHARE, "mean_opens_per_recipient": 2},
        # Other work on the machine slows every process and inflates CPU per event.
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "trackbuf": trackbuf,
        "trackbuf_before": before,
        "naive_insert_per_request": naive,
        "trackbuf_vs_naive_total": round(
            trackbuf["total_cpu_s_per_million"] / max(naive["total_cpu_s_per_million"], 0.1), 3
        ),
        "after_vs_before_total": round(
            trackbuf["total_cpu_s_per_million"] / max(before["total_cpu_s_per_million"], 0.1), 3
        ),
        "bare": bare,
        "trackbuf_vs_bare": vs_bare(trackbuf, bare),
        "smooth": {
            "target_rate": smooth_rate,
            "duration_s": smooth_s,
            "connections": SMOOTH_CONNECTIONS,
            "trackbuf": smooth_trackbuf,
            "bare": smooth_bare,
            "trackbuf_vs_bare": vs_bare(smooth_trackbuf, smooth_bare),
            "rounds": smooth_rounds,
            # Every round, in the order run: how far the machine moved meanwhile.
            "bare_us_per_request_rounds": [r["cpu_us_per_request"] for r in bare_rounds],
            "trackbuf_us_per_event_rounds": [r["total_cpu_s_per_million"] for r in trackbuf_rounds],
        },
    }


def vs_bare(pipeline: dict[str, Any], bare: dict[str, Any]) -> float:
    """Whole-pipeline CPU per stored event over the bare handler's CPU per request
    (CPU seconds per million events are microseconds per event)."""
    ratio = float(pipeline["total_cpu_s_per_million"]) / max(float(bare["cpu_us_per_request"]), 0.1)
    return round(ratio, 2)


def st_keyring() -> Keyring:
    return Keyring.parse(st.KEYS)


def measure_idle(work: Path, seconds: float) -> dict[str, Any]:
    """What a consumer with nothing to do costs: its CPU share and beanstalkd's, and the
    reserve commands it sends, over ``seconds``. Four threads on one server (the
    default), and one thread over a pool of three (the case that polled all of them)."""
    stack = st.Stack.start(work, "idle")
    extra = [Beanstalkd(work / f"idle-binlog-{i}", "-f", "0").start() for i in (1, 2)]
    try:
        out = {}
        for name, servers, threads in (("one_server_4_threads", [stack.bs], 4),
                                       ("pool_of_3_1_thread", [stack.bs, *extra], 1)):  # fmt: skip
            address = ",".join(server.address for server in servers)
            consumer, _ = st.start_consumer(stack, f"idle-{name}", TRACKBUF_BEANSTALKD=address,
                                            TRACKBUF_THREADS=str(threads))  # fmt: skip
            time.sleep(2)  # past start-up
            pids = [consumer.proc.pid, *(server.proc.pid for server in servers if server.proc)]
            cpu_before = [cpu_seconds(pid) for pid in pids]
            reserves_before = sum(_reserves(server) for server in servers)
            time.sleep(seconds)
            cpu = [cpu_seconds(pid) - then for pid, then in zip(pids, cpu_before, strict=True)]
            reserves = sum(_reserves(server) for server in servers) - reserves_before
            consumer.stop()
            out[name] = {"consumer_core_share": round(cpu[0] / seconds, 4),
                         "beanstalkd_core_share": round(sum(cpu[1:]) / seconds, 4),
                         "reserves_per_s": round(reserves / seconds, 1),
                         "threads": threads, "servers": len(servers)}  # fmt: skip
        return {"seconds": seconds, **out}
    finally:
        for server in extra:
            server.kill()
        stack.close()


def _reserves(server: Beanstalkd) -> int:
    stats = server.stats()
    return stats["cmd-reserve"] + stats["cmd-reserve-with-timeout"]
