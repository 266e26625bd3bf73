"""The consumer and the operator tools over a pool of independent beanstalkd servers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from consumer.queue_metrics import QueueCollector
from tests.conftest import pool_address
from tests.integration.test_pipeline import drain, rows
from tests.pool import backlog, fill, stored, wait_stored
from tests.procs import Process, trackbuf
from tests.servers import Beanstalkd
from trackbuf import codec
from trackbuf.events import new_event
from trackbuf.settings import Settings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_every_server_of_the_pool_is_drained_whatever_the_thread_count(
    make_settings, beanstalkd_pool: list[Beanstalkd], threads: int
) -> None:
    settings: Settings = make_settings(beanstalkd=pool_address(beanstalkd_pool), threads=threads)
    sent = fill(beanstalkd_pool, jobs_each=40, events_per_job=3)
    assert drain(settings) == 0
    found = stored(settings.database_url)
    assert len(found) == len(sent) and set(found) == sent  # every event, once
    assert [backlog(server) for server in beanstalkd_pool] == [0, 0, 0]


def test_a_backlog_on_one_server_is_not_starved_by_idle_ones(
    make_settings, beanstalkd_pool: list[Beanstalkd], tmp_path: Path
) -> None:
    # One thread over three servers, two of them idle: the busy one drains at once,
    # not one batch per idle wait on the others (60 batches of 10: a one-second wait
    # on each idle server per batch would take two minutes).
    settings: Settings = make_settings(
        beanstalkd=pool_address(beanstalkd_pool), threads=1, batch_size=10
    )
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    consumer.wait_http(f"http://{settings.metrics_listen}/readyz")
    sent = fill(beanstalkd_pool[1:2], jobs_each=600)
    found = wait_stored(settings.database_url, len(sent), timeout=15)
    assert consumer.terminate() == 0
    assert sorted(found) == sorted(sent)


def test_two_consumer_processes_on_one_pool_store_every_event_once(
    make_settings, beanstalkd_pool: list[Beanstalkd], tmp_path: Path
) -> None:
    settings: Settings = make_settings(beanstalkd=pool_address(beanstalkd_pool), threads=2)
    sent = fill(beanstalkd_pool, jobs_each=300, events_per_job=2)
    second: Settings = make_settings(beanstalkd=pool_address(beanstalkd_pool), threads=2)
    consumers = [
        Process(settings, "consume", log_path=tmp_path / "a.log"),
        Process(second, "consume", log_path=tmp_path / "b.log"),
    ]
    # Both running before the check: on a busy machine the first can store everything
    # while the second still starts.
    for consumer, its in zip(consumers, (settings, second), strict=True):
        consumer.wait_http(f"http://{its.metrics_listen}/healthz", timeout=60)
    found = wait_stored(settings.database_url, len(sent))
    for consumer in consumers:
        assert consumer.terminate() == 0
    assert len(found) == len(sent) and set(found) == sent
    assert [backlog(server) for server in beanstalkd_pool] == [0, 0, 0]


def test_status_shows_each_server_and_the_total_with_one_down(
    make_settings, beanstalkd_pool: list[Beanstalkd]
) -> None:
    settings: Settings = make_settings(beanstalkd=pool_address(beanstalkd_pool))
    fill(beanstalkd_pool[:1], jobs_each=3)
    fill(beanstalkd_pool[2:], jobs_each=5)
    down = beanstalkd_pool[1]
    down.kill()
    args = ("--interval", "0.1", "--ingest-url", "", "--consumer-url", "")
    shown = trackbuf(settings, "status", "--json", *args)
    report = json.loads(shown.stdout)
    assert shown.returncode == 1
    assert report["beanstalkd_up"] is False
    assert report["jobs"]["ready"] == 8  # the servers that answered
    servers = {server["address"]: server for server in report["servers"]}
    assert list(servers) == [server.address for server in beanstalkd_pool]
    assert servers[down.address]["up"] is False
    assert servers[beanstalkd_pool[0].address]["jobs"]["ready"] == 3
    assert servers[beanstalkd_pool[2].address]["jobs"]["ready"] == 5
    assert f"beanstalkd {down.address} is unreachable" in report["problems"]

    human = trackbuf(settings, "status", *args).stdout.splitlines()
    assert "(1 of 3 DOWN)" in next(line for line in human if line.startswith("queue "))
    lines = {line.split()[1]: line for line in human if line.startswith("server ")}
    assert "DOWN" in lines[down.address]
    assert "ready 3" in lines[beanstalkd_pool[0].address]
    assert "ready 5" in lines[beanstalkd_pool[2].address]
    assert any(line.startswith("PROBLEM") and down.address in line for line in human)


def test_queue_metrics_are_per_server(beanstalkd_pool: list[Beanstalkd]) -> None:
    fill(beanstalkd_pool[:1], jobs_each=2)
    fill(beanstalkd_pool[1:2], jobs_each=7)
    beanstalkd_pool[2].kill()
    registry = CollectorRegistry()
    addresses = [("127.0.0.1", server.port) for server in beanstalkd_pool]
    QueueCollector(addresses, "trackbuf-events").register(registry)
    first, second, gone = (server.address for server in beanstalkd_pool)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    ready = {"tube": "trackbuf-events", "state": "ready"}
    assert value("trackbuf_queue_jobs", server=first, **ready) == 2
    assert value("trackbuf_queue_jobs", server=second, **ready) == 7
    assert value("trackbuf_queue_jobs", server=gone, **ready) is None
    assert [value("trackbuf_queue_up", server=s) for s in (first, second, gone)] == [1, 1, 0]
    assert value("trackbuf_queue_oldest_ready_age_seconds", server=second,
                 tube="trackbuf-events") is not None  # fmt: skip


def test_dead_kick_goes_to_the_next_server_when_the_first_is_down(
    make_settings, beanstalkd_pool: list[Beanstalkd]
) -> None:
    settings: Settings = make_settings(beanstalkd=pool_address(beanstalkd_pool), threads=3)
    event = new_event("open", "c", "kicked-back")
    with beanstalkd_pool[1].client() as client:
        client.put(codec.encode_job([codec.encode_event(event)]))
    rows(settings.database_url, "ALTER TABLE events ADD CONSTRAINT no_c CHECK (campaign <> 'c')")
    assert drain(settings) == 0
    listed = trackbuf(settings, "dead", "list")
    assert listed.stdout.startswith("1 dead letter(s)")
    dead_id = listed.stdout.splitlines()[1].split("\t")[0]

    rows(settings.database_url, "ALTER TABLE events DROP CONSTRAINT no_c")
    beanstalkd_pool[0].kill()
    kicked = trackbuf(settings, "dead", "kick", dead_id)
    assert kicked.returncode == 0, kicked.stderr
    assert beanstalkd_pool[0].address in kicked.stderr  # said it moved on
    assert [backlog(server) for server in beanstalkd_pool[1:]] == [1, 0]
    assert trackbuf(settings, "dead", "list").stdout.startswith("0 dead letter(s)")

    beanstalkd_pool[0].start()  # a burst run waits for every server of the pool
    assert drain(settings) == 0
    assert Counter(stored(settings.database_url)) == {"kicked-back": 1}


def test_dead_kick_fails_when_no_server_takes_it(
    make_settings, beanstalkd_pool: list[Beanstalkd]
) -> None:
    settings: Settings = make_settings(beanstalkd=pool_address(beanstalkd_pool))
    insert = "INSERT INTO dead_letters (reason, body, fingerprint) VALUES ('x', 'y', sha256('y'))"
    rows(settings.database_url, insert)
    for server in beanstalkd_pool:
        server.kill()
    kicked = trackbuf(settings, "dead", "kick", "--all")
    assert kicked.returncode == 1
    assert trackbuf(settings, "dead", "list").stdout.startswith("1 dead letter(s)")
