from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from loadtest.bench import histogram_quantile
from loadtest.cost import per_million, traffic_lines
from loadtest.servers import cpu_seconds
from loadtest.traffic import USER_AGENTS, rate_at, require_loopback
from trackbuf import tokens


def test_profiles_shape_the_rate() -> None:
    assert rate_at("steady", 100, 5, 10) == 100
    assert rate_at("spike", 100, 1, 10) == 100
    assert rate_at("spike", 100, 5, 10) == 1000  # the middle tenth is 10x
    assert rate_at("burst", 100, 0, 10) == 100
    assert rate_at("burst", 100, 5, 10) < 30  # decays
    with pytest.raises(ValueError):
        rate_at("sawtooth", 100, 1, 10)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8080", "http://example.com", "http://[::2]/"])
def test_load_goes_to_loopback_only(url: str) -> None:
    with pytest.raises(ValueError, match="loopback only"):
        require_loopback(url)


def test_loopback_is_allowed() -> None:
    for url in (
        "http://127.0.0.1:8080",
        "http://localhost:1",
        "http://[::1]:8080",
        "http://127.0.0.9",
    ):
        require_loopback(url)


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    name = "h"
    before = {'h_bucket{le="0.1"}': 0.0, 'h_bucket{le="1.0"}': 0.0, 'h_bucket{le="+Inf"}': 0.0}
    after = {'h_bucket{le="0.1"}': 50.0, 'h_bucket{le="1.0"}': 100.0, 'h_bucket{le="+Inf"}': 100.0}
    assert histogram_quantile(0.5, before, after, name) == pytest.approx(0.1)
    assert histogram_quantile(0.75, before, after, name) == pytest.approx(0.55)


def test_cpu_seconds_counts_a_process_and_its_children() -> None:
    # The ingest benchmark divides server CPU by requests; nginx serves from children.
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    child = subprocess.Popen([sys.executable, "-c", burn + "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while cpu_seconds(child.pid) < 0.3:
            assert time.monotonic() < deadline, "the child's CPU time never showed"
            time.sleep(0.05)
        assert cpu_seconds(os.getpid()) >= cpu_seconds(child.pid)  # parent includes it
    finally:
        child.kill()
        child.wait()
    assert cpu_seconds(child.pid) == 0.0  # gone: nothing to count


def test_wrk_urls_are_signed_paths_of_the_asked_kind() -> None:
    from trackbuf import tokens
    from trackbuf.tokens import Keyring

    keys = "k1:wrk-url-test-secret-0001-0123456789ab"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", "urls", "--count", "50", "--mix", "mixed"],
        env={**os.environ, "TRACKBUF_SIGNING_KEYS": keys}, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    paths = done.stdout.splitlines()
    assert len(paths) == len(set(paths)) == 50
    kinds = []
    for path in paths:
        kind = "open" if path.startswith("/o/") else "click"
        token = path.removeprefix("/o/").removesuffix(".gif").removeprefix("/c/")
        kinds.append(tokens.verify(Keyring.parse(keys), token, kind).kind)
    assert "open" in kinds and "click" in kinds
    unsigned = subprocess.run([sys.executable, "-m", "loadtest", "urls"], capture_output=True,
                              text=True, env={k: v for k, v in os.environ.items()
                                              if k != "TRACKBUF_SIGNING_KEYS"})  # fmt: skip
    assert unsigned.returncode == 2 and "TRACKBUF_SIGNING_KEYS" in unsigned.stderr


def test_cost_traffic_mixes_opens_repeat_opens_and_clicks() -> None:
    keyring = tokens.Keyring.parse("k1:" + "s" * 32)
    lines = list(traffic_lines(keyring, 5000, "t"))
    assert len(lines) == 5000
    paths = [line.split("\t")[0] for line in lines]
    assert all(line.split("\t")[1] in USER_AGENTS for line in lines)
    opens = [p for p in paths if p.startswith("/o/")]
    clicks = [p for p in paths if p.startswith("/c/")]
    assert len(opens) + len(clicks) == 5000
    assert 0.05 < len(clicks) / 5000 < 0.2  # one recipient in five clicks; opens repeat
    assert 1.7 < len(opens) / len(set(opens)) < 2.3  # two opens per recipient on average
    # Every line is a token ingest accepts.
    token = clicks[0].removeprefix("/c/")
    assert tokens.verify(keyring, token, "click").recipient.startswith("t-")


def test_cost_is_cpu_per_million_stored_and_cores_at_10k() -> None:
    cost = per_million({"ingest": 2.0, "postgresql_backends": 1.0}, 100_000, 5000)
    assert cost["cpu_s_per_million"] == {"ingest": 20.0, "postgresql_backends": 10.0}
    assert cost["total_cpu_s_per_million"] == 30.0
    assert cost["cores_at_10k_per_s"] == 0.3  # 30 us of CPU per event, 10,000 a second
    assert cost["cores_at_measured_rate"] == 0.15
