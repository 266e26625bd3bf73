"""The request tally must expose exactly what direct prometheus-client calls would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from ingest.metrics import LATENCY_BUCKETS, IngestMetrics
from ingest.tally import RequestTally

# Every bound exactly (observe() counts a value equal to a bound in that bucket), values
# between them, zero, and one past the last bound (+Inf).
LATENCIES = [0.0, *LATENCY_BUCKETS, *(b * 0.7 for b in LATENCY_BUCKETS), 12.5]


def samples(registry: CollectorRegistry) -> list[str]:
    # _created timestamps differ between two registries by construction: leave them out.
    return [line for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line]  # fmt: skip


def test_a_flushed_tally_exposes_what_direct_calls_would() -> None:
    direct_registry, tallied_registry = CollectorRegistry(), CollectorRegistry()
    direct = IngestMetrics.create(direct_registry)
    tally = RequestTally(IngestMetrics.create(tallied_registry))
    for i, seconds in enumerate(LATENCIES):
        route, outcome = ("open", "queued") if i % 3 else ("click", "spooled")
        direct.request_counter(route, outcome).inc()
        direct.duration(route).observe(seconds)
        direct.event_counter(route, outcome).inc()
        tally.request(route, outcome, seconds)
        tally.event(route, outcome)
        if i == len(LATENCIES) // 2:
            tally.flush()  # flushing in between must not count anything twice
    tally.flush()
    tally.flush()  # nothing new: adds nothing
    assert samples(tallied_registry) == samples(direct_registry)
    count = tallied_registry.get_sample_value(
        "trackbuf_ingest_request_duration_seconds_count", {"route": "open"}
    )
    assert count == sum(1 for i in range(len(LATENCIES)) if i % 3)


def test_nothing_shows_before_a_flush() -> None:
    registry = CollectorRegistry()
    tally = RequestTally(IngestMetrics.create(registry))
    tally.request("open", "queued", 0.003)
    labels = {"route": "open", "outcome": "queued"}
    assert registry.get_sample_value("trackbuf_ingest_requests_total", labels) == 0
    tally.flush()
    assert registry.get_sample_value("trackbuf_ingest_requests_total", labels) == 1
