"""A pool of beanstalkd servers where one dies or hangs: the others keep draining.

A server that goes away costs only its own jobs' latency: they wait in its binlog (or
go back to ready at TTR) and drain once it is back. Nothing is lost or stored twice.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import pool_address
from tests.pool import backlog, fill, stored, wait_stored
from tests.procs import Process
from tests.servers import Beanstalkd
from trackbuf.settings import Settings

pytestmark = pytest.mark.faults


def wait_drained(servers: list[Beanstalkd], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [backlog(server) for server in servers]
        if not any(left) or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_pool_server_killed_mid_drain_costs_only_its_own_jobs(
    make_settings, beanstalkd_pool: list[Beanstalkd], tmp_path: Path, threads: int
) -> None:
    settings: Settings = make_settings(
        beanstalkd=pool_address(beanstalkd_pool), threads=threads, batch_size=20
    )
    sent = fill(beanstalkd_pool, jobs_each=3000)
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    wait_stored(settings.database_url, 100)
    victim, others = beanstalkd_pool[1], [beanstalkd_pool[0], beanstalkd_pool[2]]
    victim.kill()  # kill -9: the jobs it held stay in its binlog
    assert wait_drained(others, timeout=60) == [0, 0], "the rest of the pool stalled"
    assert len(stored(settings.database_url)) < len(sent)  # the victim's jobs wait
    victim.start()  # same port, same binlog
    found = wait_stored(settings.database_url, len(sent), timeout=90)
    assert consumer.terminate() == 0
    assert len(found) == len(sent) and set(found) == sent
    assert [backlog(server) for server in beanstalkd_pool] == [0, 0, 0]
    assert "beanstalkd_unreachable" in consumer.log()


def test_a_hung_pool_server_does_not_stop_the_others(
    make_settings, beanstalkd_pool: list[Beanstalkd], tmp_path: Path
) -> None:
    settings: Settings = make_settings(beanstalkd=pool_address(beanstalkd_pool), threads=3)
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    consumer.wait_http(f"http://{settings.metrics_listen}/readyz")
    hung = beanstalkd_pool[2]
    assert hung.proc is not None
    sent = fill(beanstalkd_pool, jobs_each=500)
    hung.proc.send_signal(signal.SIGSTOP)  # the kernel still accepts, nothing answers
    try:
        assert wait_drained(beanstalkd_pool[:2], timeout=60) == [0, 0]
    finally:
        hung.proc.send_signal(signal.SIGCONT)
    found = wait_stored(settings.database_url, len(sent), timeout=60)
    assert consumer.terminate() == 0
    assert len(found) == len(sent) and set(found) == sent
