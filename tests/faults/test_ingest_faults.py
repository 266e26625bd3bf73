"""Ingest under beanstalkd faults: down at start, hung, a smaller job limit, a damaged spool.

Like test_outages.py, these drive real processes (or the real enqueue task) against a
real beanstalkd and count what was acknowledged against what was stored.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.test_outages import report
from tests.procs import start_ingest
from tests.servers import Beanstalkd

pytestmark = pytest.mark.faults


def log_events(text: str, event: str) -> list[str]:
    return [line for line in text.splitlines() if f"event={event} " in line + " "]


def wait_for_log(path: Path, event: str, count: int = 1, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = log_events(path.read_text(), event)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_beanstalkd_down_at_start_is_logged_once_per_outage_with_its_error(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    """Down from the start, ingest says so at once (not when the first event spools),
    with the error, and only once however often it retries."""
    settings = make_settings()
    log = tmp_path / "ingest.log"
    beanstalkd.stop()
    ingest = start_ingest(settings, log)
    time.sleep(2.0)  # several reconnect attempts
    first = log_events(log.read_text(), "beanstalkd_down")
    assert len(first) == 1, first
    assert "Connect call failed" in first[0] or "refused" in first[0].lower(), first[0]
    beanstalkd.start()
    assert wait_for_log(log, "beanstalkd_connected"), "never reconnected"
    beanstalkd.stop()  # a second outage, while idle: noticed and logged once more
    down = wait_for_log(log, "beanstalkd_down", count=2)
    time.sleep(1.5)
    down = log_events(log.read_text(), "beanstalkd_down")
    report("beanstalkd down at start", f"down_lines={len(down)}", "")
    assert len(down) == 2, down
    assert all("error=" in line for line in down), down
    assert ingest.terminate() == 0
