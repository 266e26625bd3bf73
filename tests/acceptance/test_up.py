"""`trackbuf up` as a newcomer runs it: embedded PostgreSQL, local beanstalkd, real URLs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port

pytestmark = pytest.mark.acceptance
ROOT = Path(__file__).resolve().parents[2]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's 0700 tmp dir: the embedded PostgreSQL runs as its own user.
    path = Path(tempfile.mkdtemp(prefix="trackbuf-up-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_up_serves_signed_links_and_rows_appear(data_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKBUF_")}
    listen = f"127.0.0.1:{free_port()}"
    env.update(
        TRACKBUF_DATA_DIR=str(data_dir),
        TRACKBUF_LISTEN=listen,
        TRACKBUF_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
        PYTHONPATH=str(ROOT),
    )
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "trackbuf", "up"],
        env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        urls = read_banner(up)
        with urllib.request.urlopen(urls["sample open pixel"], timeout=5) as response:
            assert response.status == 200 and response.read()[:6] == b"GIF89a"
        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as redirect:
            opener.open(urls["sample click link"], timeout=5)
        redirect.value.close()
        assert redirect.value.code == 302
        assert redirect.value.headers["Location"] == "https://example.com/"

        # `trackbuf events` finds the embedded database through the data dir.
        rows: list[str] = []
        deadline = time.monotonic() + 30
        while len(rows) < 2 and time.monotonic() < deadline:
            shown = subprocess.run(
                [sys.executable, "-m", "trackbuf", "events"],
                env=env, capture_output=True, text=True, cwd=tmp_path, timeout=30,
            )  # fmt: skip
            assert shown.returncode == 0, shown.stderr
            rows = [line for line in shown.stdout.splitlines()[1:] if "\twelcome\t" in line]
            time.sleep(0.3)
        assert sorted(line.split("\t")[1] for line in rows) == ["click", "open"]
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
        log.close()
        assert up.stdout is not None
        up.stdout.close()
    assert code == 0, (tmp_path / "up.log").read_text()
    assert not (data_dir / "trackbuf.env").exists()
    assert (data_dir / "binlog").is_dir() and any((data_dir / "binlog").iterdir())
    leftovers = subprocess.run(
        ["pgrep", "-f", f"beanstalkd.*{data_dir}"], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout == ""


def read_banner(up: subprocess.Popen[str]) -> dict[str, str]:
    urls: dict[str, str] = {}
    assert up.stdout is not None
    deadline = time.monotonic() + 90
    while len(urls) < 2 and time.monotonic() < deadline:
        line = up.stdout.readline()
        if not line:
            raise AssertionError(f"trackbuf up exited early with {up.wait()}")
        name, sep, value = line.strip().partition(":  ")
        if sep and name.startswith("sample"):
            urls[name] = value.strip()
    return urls
