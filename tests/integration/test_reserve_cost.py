"""The consumer waits in beanstalkd instead of polling it, counted by beanstalkd itself.

Jobs are put at their own scheduled moments (paced, like real opens and clicks), from
100 to 10,000 events/s, and beanstalkd's ``stats`` count the reserve commands the
consumer sent. Waiting costs about one reserve per job at any rate; polling cost 77.
The assertion is on counters, so a slow machine (which only makes the traffic burstier)
passes as well as a fast one.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from loadtest.servers import cpu_seconds
from tests.conftest import pool_address
from tests.pool import wait_stored
from tests.procs import Process
from tests.servers import Beanstalkd
from trackbuf import codec
from trackbuf import metric_names as names
from trackbuf.events import new_event
from trackbuf.settings import Settings

pytestmark = pytest.mark.integration

# (jobs per second, seconds, events per job): 100, 2,000 and 10,000 events/s.
PHASES = [(100, 2.0, 1), (500, 2.0, 4), (1000, 2.0, 10)]
MOST_RESERVES_PER_JOB = 2.0


def put_paced(servers: list[Beanstalkd], phases: list[tuple[int, float, int]]) -> set[str]:
    """Put jobs at their scheduled moments, round-robin over ``servers``; the
    recipients of every event put."""
    clients = [server.client() for server in servers]
    sent: set[str] = set()
    n = 0
    try:
        for rate, seconds, events in phases:
            start = time.monotonic()
            for i in range(int(rate * seconds)):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                recipients = [f"j{n}-e{e}" for e in range(events)]
                batch = [codec.encode_event(new_event("open", "paced", r)) for r in recipients]
                clients[n % len(clients)].put(codec.encode_job(batch))
                sent.update(recipients)
                n += 1
    finally:
        for client in clients:
            client.close()
    return sent


def reserves_and_jobs(servers: list[Beanstalkd]) -> tuple[int, int]:
    """Reserve commands received and jobs put, summed over the servers."""
    reserves = jobs = 0
    for server in servers:
        stats = server.stats()
        reserves += stats["cmd-reserve"] + stats["cmd-reserve-with-timeout"]
        jobs += stats["total-jobs"]
    return reserves, jobs


def counter(metrics_listen: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{metrics_listen}/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "_total "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def run_paced(settings: Settings, servers: list[Beanstalkd], tmp_path: Path) -> None:
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    consumer.wait_http(f"http://{settings.metrics_listen}/readyz")
    sent = put_paced(servers, PHASES)
    found = wait_stored(settings.database_url, len(sent))
    before, jobs = reserves_and_jobs(servers)
    sent_by_consumer = counter(settings.metrics_listen, names.CONSUMER_RESERVE_COMMANDS)
    reserved = counter(settings.metrics_listen, names.CONSUMER_JOBS_RESERVED)
    after, _ = reserves_and_jobs(servers)
    assert consumer.terminate() == 0
    assert len(found) == len(sent) and set(found) == sent  # every event, once
    ratio = before / jobs
    print(f"\n{len(servers)} server(s), {settings.threads} threads: {jobs} jobs, "
          f"{before} reserve commands, {ratio:.2f} per job")  # fmt: skip
    assert ratio <= MOST_RESERVES_PER_JOB
    # The consumer's own counters agree with beanstalkd's (idle waits may go out
    # between the reads: one a second per thread).
    assert before - settings.threads <= sent_by_consumer <= after
    assert reserved == jobs  # no redelivery on a healthy run


def test_paced_traffic_costs_at_most_two_reserves_per_job(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    settings: Settings = make_settings(linger_ms=200, threads=4)
    run_paced(settings, [beanstalkd], tmp_path)


@pytest.mark.parametrize("threads", [1, 4])
def test_paced_traffic_over_a_pool_costs_at_most_two_reserves_per_job(
    make_settings, beanstalkd_pool: list[Beanstalkd], tmp_path: Path, threads: int
) -> None:
    # One thread waits on all three servers at once; four have one server each (and
    # one server has two).
    settings: Settings = make_settings(
        beanstalkd=pool_address(beanstalkd_pool), linger_ms=200, threads=threads
    )
    run_paced(settings, beanstalkd_pool, tmp_path)


def test_an_idle_consumer_neither_polls_nor_burns_cpu(
    make_settings, beanstalkd_pool: list[Beanstalkd], tmp_path: Path
) -> None:
    # One thread over three servers: the case that used to poll all of them in turn
    # (reserve-with-timeout 0 on each, ten rounds a second) for want of a blocking
    # reserve that would not hold up the other servers.
    settings: Settings = make_settings(beanstalkd=pool_address(beanstalkd_pool), threads=1)
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    consumer.wait_http(f"http://{settings.metrics_listen}/readyz")
    time.sleep(1)  # past start-up (imports, connections)
    idle_s = 10.0
    reserves_before, _ = reserves_and_jobs(beanstalkd_pool)
    cpu_before = cpu_seconds(consumer.proc.pid)
    time.sleep(idle_s)
    cpu = cpu_seconds(consumer.proc.pid) - cpu_before
    reserves = reserves_and_jobs(beanstalkd_pool)[0] - reserves_before
    assert consumer.terminate() == 0
    print(f"\nidle consumer: {cpu / idle_s:.2%} of a core, {reserves / idle_s:.1f} reserves/s")
    # One blocking reserve a second per connection (timeouts are whole seconds); the
    # polling design sent 30 a second here.
    assert reserves <= len(beanstalkd_pool) * (idle_s + 2)
    assert cpu / idle_s < 0.05
