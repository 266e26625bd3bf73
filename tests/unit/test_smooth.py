"""The smooth-traffic driver's pure parts: the arrival schedule and response framing."""

from __future__ import annotations

import asyncio
import itertools
import statistics

import pytest

from loadtest.smooth import drive, percentile, poisson_schedule, response_length


def test_the_schedule_is_a_seeded_poisson_process_within_the_run() -> None:
    moments = poisson_schedule(3000, 10, seed=1)
    assert moments == poisson_schedule(3000, 10, seed=1)  # the same run every time
    assert moments != poisson_schedule(3000, 10, seed=2)
    assert all(0 <= a < b < 10 for a, b in itertools.pairwise(moments))
    assert 29_000 < len(moments) < 31_000
    gaps = [b - a for a, b in itertools.pairwise(moments)]
    # Exponential gaps: as spread as they are long (wrk's paced connections are not).
    assert 0.95 < statistics.stdev(gaps) / statistics.mean(gaps) < 1.05
    # No step: the busiest millisecond holds a handful, as Poisson at 3/ms does.
    per_ms = [0] * 10_000
    for moment in moments:
        per_ms[int(moment * 1000)] += 1
    assert max(per_ms) < 15


@pytest.mark.parametrize(("rate", "seconds"), [(0, 1), (-5, 1), (100, 0)])
def test_a_schedule_needs_a_positive_rate_and_duration(rate: float, seconds: float) -> None:
    with pytest.raises(ValueError):
        poisson_schedule(rate, seconds)


def test_responses_are_framed_by_content_length() -> None:
    pixel = b"HTTP/1.1 200 OK\r\nContent-Type: image/gif\r\nContent-Length: 3\r\n\r\nGIF"
    redirect = b"HTTP/1.1 302 Found\r\nLocation: https://x/\r\ncontent-length: 0\r\n\r\n"
    assert response_length(pixel[:20]) is None  # head incomplete
    assert response_length(pixel[:-1]) is None  # body incomplete
    assert response_length(pixel) == (200, len(pixel))
    assert response_length(pixel + redirect) == (200, len(pixel))  # the first one only
    assert response_length(redirect) == (302, len(redirect))
    no_body = b"HTTP/1.1 204 No Content\r\n\r\n"
    assert response_length(no_body) == (204, len(no_body))
    with pytest.raises(ValueError):
        response_length(b"SSH-2.0-OpenSSH\r\n\r\n")


def test_percentile_of_nothing_is_nan_and_of_values_is_a_value() -> None:
    assert percentile([], 0.99) != percentile([], 0.99)  # nan
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(100)], 0.99) == 99.0


def test_load_goes_to_loopback_only() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        asyncio.run(drive("10.0.0.1:80", ["/o/x.gif\tua"], 10, 1))
