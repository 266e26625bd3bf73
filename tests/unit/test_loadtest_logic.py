from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from loadtest.bench import histogram_quantile
from loadtest.servers import cpu_seconds
from loadtest.traffic import rate_at, require_loopback


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
