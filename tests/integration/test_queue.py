"""The consumer's pipelined beanstalkd commands, against a real beanstalkd."""

from __future__ import annotations

import select
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.pool import wait_stored
from tests.servers import Beanstalkd
from trackbuf import beanstalk_client, codec
from trackbuf.events import new_event

pytestmark = pytest.mark.integration

TUBE = "pipelined"


def test_reserve_ready_takes_many_jobs_in_one_round_trip(beanstalkd: Beanstalkd) -> None:
    client = beanstalk_client.connect(("127.0.0.1", beanstalkd.port), TUBE)
    try:
        for i in range(5):
            client.put(b"job-%d" % i)
        first, soon = client.reserve_ready(3)
        assert [job.body for job in first] == [b"job-0", b"job-1", b"job-2"] and not soon
        rest, soon = client.reserve_ready(5)  # only two left: the others time out
        assert [job.body for job in rest] == [b"job-3", b"job-4"] and not soon
        assert client.reserve_ready(2) == ([], False)
        stats = beanstalkd.tube_stats(TUBE)
        assert stats["current-jobs-reserved"] == 5
        # The connection is still in step after all that: plain commands work.
        assert client.delete_many(first + rest) == 5
        assert client.delete_many(first) == 0  # already gone: NOT_FOUND, not an error
        assert beanstalkd.tube_stats(TUBE)["current-jobs-reserved"] == 0
        client.put(b"after")
        assert client.reserve(timeout=0).body == b"after"
    finally:
        client.close()


def test_reserve_ready_reports_a_held_job_near_its_ttr(beanstalkd: Beanstalkd) -> None:
    client = beanstalk_client.connect(("127.0.0.1", beanstalkd.port), TUBE)
    try:
        client.put(b"short", ttr=1)  # within beanstalkd's 1 s safety margin at once
        held = client.reserve(timeout=0)
        assert client.reserve_ready(2) == ([], True)
        assert client.delete_many([held]) == 1
    finally:
        client.close()


def test_a_blocking_reserve_waits_in_beanstalkd_and_is_answered_later(
    beanstalkd: Beanstalkd,
) -> None:
    client = beanstalk_client.connect(("127.0.0.1", beanstalkd.port), TUBE)
    producer = beanstalk_client.connect(("127.0.0.1", beanstalkd.port), TUBE)
    try:
        client.begin_reserve(1)
        with pytest.raises(RuntimeError):
            client.delete_many([1])  # would be read as the reserve's answer: refused
        producer.put(b"late")
        assert select.select([client], [], [], 10)[0] == [client]
        job = client.finish_reserve()
        assert job is not None and job.body == b"late"
        client.begin_reserve(1)
        assert client.finish_reserve() is None  # TIMED_OUT after its second
        assert client.delete_many([job]) == 1  # in step: ordinary commands work again
        assert beanstalkd.stats()["cmd-reserve-with-timeout"] == 2
    finally:
        client.close()
        producer.close()


def test_a_blocking_reserve_reports_a_held_job_near_its_ttr(beanstalkd: Beanstalkd) -> None:
    client = beanstalk_client.connect(("127.0.0.1", beanstalkd.port), TUBE)
    try:
        client.put(b"short", ttr=1)
        held = client.reserve(timeout=0)
        client.begin_reserve(1)
        with pytest.raises(beanstalk_client.DeadlineSoon):
            client.finish_reserve()
        assert client.delete_many([held]) == 1
    finally:
        client.close()


def test_a_closed_connection_is_a_connection_error(beanstalkd: Beanstalkd) -> None:
    client = beanstalk_client.connect(("127.0.0.1", beanstalkd.port), TUBE)
    try:
        client.put(b"x")
        beanstalkd.kill()
        with pytest.raises(beanstalk_client.CONNECTION_ERRORS):
            client.reserve_ready(4)
    finally:
        client.close()
        beanstalkd.start()


def test_the_commands_tools_and_the_kicker_use(beanstalkd: Beanstalkd) -> None:
    with beanstalk_client.connect(("127.0.0.1", beanstalkd.port), TUBE) as client:
        first = client.put(b"one")
        client.put(b"two")
        assert client.peek_ready().body == b"one"
        assert client.stats_job(first)["state"] == "ready"
        job = client.reserve(timeout=0)
        client.bury(job)
        assert client.stats_tube(TUBE)["current-jobs-buried"] == 1
        assert client.kick(10) == 1
        job = client.reserve(timeout=0)
        client.release(job)
        with pytest.raises(beanstalk_client.NotFound):
            client.release(job)  # released already: not ours
        client.pause_tube(TUBE, 0)
        assert client.stats()["current-jobs-ready"] == 2
        with pytest.raises(beanstalk_client.NotFound):
            client.stats_tube("no-such-tube")
    with (
        beanstalk_client.connect(("127.0.0.1", beanstalkd.port), "empty") as client,
        pytest.raises(beanstalk_client.ReserveTimedOut),
    ):
        client.reserve(timeout=0)


def test_a_peer_that_is_not_beanstalkd_is_a_connection_error(beanstalkd: Beanstalkd) -> None:
    """Whatever answers, the worker sees an error it drops the connection for."""
    with socket.create_server(("127.0.0.1", 0)) as server:

        def answer_http() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer_http, daemon=True).start()
        with pytest.raises(beanstalk_client.CONNECTION_ERRORS):
            beanstalk_client.connect(server.getsockname(), TUBE)


def test_our_protocol_layer_agrees_with_an_independent_client(beanstalkd: Beanstalkd) -> None:
    """What greenstalk (a client that shares no code with trackbuf) puts, ours reserves
    and deletes in pipelined rounds, and greenstalk then sees exactly that."""
    import greenstalk

    bodies = [b"job-%d \xff\x00 binary" % i for i in range(4)]
    with greenstalk.Client(("127.0.0.1", beanstalkd.port), encoding=None, use=TUBE) as theirs:
        for body in bodies:
            theirs.put(body, ttr=60)
        with beanstalk_client.connect(("127.0.0.1", beanstalkd.port), TUBE) as ours:
            jobs, _ = ours.reserve_ready(10)
            assert [job.body for job in jobs] == bodies
            assert ours.delete_many(jobs[:3]) == 3
            ours.release(jobs[3])
        stats = theirs.stats_tube(TUBE)
        assert stats["current-jobs-ready"] == 1 and stats["cmd-delete"] == 3
        theirs.watch(TUBE)
        left = theirs.reserve(timeout=0)
        assert left.body == bodies[3]
        theirs.delete(left)


def test_a_consumer_outlives_beanstalkd_going_away_again_and_again(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    """beanstalkd stopped and started six times under a consumer of two threads, a job
    stored just before each stop: every job is stored, no worker dies, and the
    consumer stops cleanly. (A worker that lost its last connection while waiting
    for another thread's turn once died of StopIteration; test_observability's
    beanstalkd outage showed it about one run in two.)"""
    from tests.procs import Process

    settings = make_settings(threads=2)
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    consumer.wait_http(f"http://{settings.metrics_listen}/readyz")
    for i in range(6):
        # A job stored just before each stop: its delete may still be in flight.
        with beanstalkd.client() as client:
            event = codec.encode_event(new_event("open", "again", f"r{i}"))
            client.put(codec.encode_job([event]))
        assert len(wait_stored(settings.database_url, i + 1, timeout=30)) == i + 1, consumer.log()
        beanstalkd.stop()
        time.sleep(0.3)
        beanstalkd.start()
    assert sorted(wait_stored(settings.database_url, 6)) == [f"r{i}" for i in range(6)]
    assert "worker_crashed" not in consumer.log()
    assert consumer.terminate() == 0, consumer.log()
