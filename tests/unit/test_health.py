"""Readiness rules shared by the consumer's worker threads (no servers needed)."""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry

from consumer.health import Health
from consumer.metrics import ConsumerMetrics


def make_health() -> tuple[Health, CollectorRegistry]:
    registry = CollectorRegistry()
    return Health(ConsumerMetrics.create(registry)), registry


def database_up(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("trackbuf_consumer_database_up")


def test_not_ready_until_a_worker_reaches_the_database() -> None:
    health, registry = make_health()
    assert not health.ready and database_up(registry) == 0
    health.database(True)
    assert health.ready and database_up(registry) == 1


def test_latest_observation_wins_over_a_worker_still_backing_off() -> None:
    # One worker saw the outage and is asleep; another has since committed.
    health, registry = make_health()
    health.database(False)
    health.committed()
    assert health.ready and database_up(registry) == 1
    health.database(False)  # a later failure is news again
    assert not health.ready and database_up(registry) == 0


def test_a_commit_wakes_a_worker_backing_off() -> None:
    health, _ = make_health()
    stop = threading.Event()
    timer = threading.Timer(0.2, health.committed)
    timer.start()
    started = time.monotonic()
    health.pause(30.0, stop)
    timer.join()
    assert time.monotonic() - started < 5.0


def test_a_stop_request_ends_the_pause() -> None:
    health, _ = make_health()
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    health.pause(30.0, stop)
    assert time.monotonic() - started < 5.0


def test_pause_lasts_its_time_when_nothing_happens() -> None:
    health, _ = make_health()
    started = time.monotonic()
    health.pause(0.3, threading.Event())
    assert time.monotonic() - started >= 0.3
