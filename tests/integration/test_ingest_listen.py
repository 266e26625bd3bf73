"""A second ``trackbuf ingest`` on a port already taken refuses to start, and says how
to move it; it never shares the port with the first (SO_REUSEPORT would let it)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from tests.conftest import KEYS
from tests.procs import Process, trackbuf
from tests.servers import Beanstalkd, free_port
from trackbuf import links
from trackbuf import settings as tsettings
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration


def ingest_settings(beanstalkd: Beanstalkd, tmp_path: Path, workers: int) -> Settings:
    return tsettings.load(
        {},
        overrides={
            "beanstalkd": beanstalkd.address,
            "signing_keys": KEYS,
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "workers": workers,
            "data_dir": str(tmp_path / "data"),
            "spool_dir": str(tmp_path / "spool"),
            "shutdown_timeout": 3.0,
        },
    )


def get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status)


@pytest.mark.parametrize("first_workers", [1, 2])
def test_a_second_ingest_on_a_taken_port_exits_2_and_the_first_keeps_serving(
    beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path, first_workers: int
) -> None:
    settings = ingest_settings(beanstalkd, tmp_path, first_workers)
    first = Process(settings, "ingest", log_path=tmp_path / "first.log")
    first.wait_http(f"http://{settings.listen}/healthz")
    for second_workers in ("1", "2"):
        # Its own data directory: only the address is shared.
        second = trackbuf(
            settings,
            "ingest",
            "--workers",
            second_workers,
            "--data-dir",
            str(tmp_path / f"second-{second_workers}"),
            timeout=30,
        )
        assert second.returncode == 2, second.stderr
        message = second.stderr.strip()
        assert message.startswith(f"trackbuf ingest: cannot listen on {settings.listen}: ")
        assert "already in use" in message
        assert "--listen" in message and "TRACKBUF_LISTEN" in message
        assert "Traceback" not in second.stderr
        assert len(message.splitlines()) == 1, message
    # The first never noticed: it answers every request (with a shared port, some
    # connections would have gone to the second while it ran).
    base = f"http://{settings.listen}"
    for i in range(20):
        assert get(links.open_url(base, keyring, "clash", f"r{i}")) == 200
    assert first.terminate() == 0
    assert "Traceback" not in first.log()


def test_an_address_that_cannot_be_resolved_is_a_clear_error(
    beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    settings = ingest_settings(beanstalkd, tmp_path, 1)
    done = trackbuf(settings, "ingest", "--listen", "no-such-host.invalid:8080", timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("trackbuf ingest: cannot listen on no-such-host.invalid:8080")
    assert "--listen" in done.stderr and "Traceback" not in done.stderr
