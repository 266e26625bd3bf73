"""Readiness rules shared by the consumer's worker threads (no servers needed)."""

from __future__ import annotations

import threading
import time

import pytest
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


def test_end_to_end_histogram_takes_one_value_for_many_events() -> None:
    registry = CollectorRegistry()
    metrics = ConsumerMetrics.create(registry)
    metrics.end_to_end.observe_many(0.1, 25)  # on a bound: Prometheus buckets are <=
    metrics.end_to_end.observe_many(7200.0, 5)

    def bucket(le: str) -> float | None:
        name = "trackbuf_consumer_end_to_end_latency_seconds_bucket"
        return registry.get_sample_value(name, {"le": le})

    assert bucket("0.05") == 0 and bucket("0.1") == 25 and bucket("3600.0") == 25
    assert bucket("14400.0") == 30 and bucket("+Inf") == 30
    total = registry.get_sample_value("trackbuf_consumer_end_to_end_latency_seconds_sum")
    assert total == pytest.approx(25 * 0.1 + 5 * 7200.0)
