"""No spool is stranded: a clean stop puts the spool into beanstalkd before exit when a
server takes it, or says how many events are left and where; ``trackbuf spool replay
--dir`` puts a directory left behind into beanstalkd from any host.

Real ingest processes, a real beanstalkd; nothing consumes unless the test drains.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from commands import status
from tests.faults.test_outages import metric
from tests.load import Load
from tests.procs import start_ingest, trackbuf
from tests.servers import Beanstalkd, take_in_order
from trackbuf.log import parse
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.faults

TUBE = "trackbuf-events"


def log_line(text: str, event: str) -> dict[str, str]:
    for line in text.splitlines():
        if f"event={event} " in line + " ":
            return parse(line)
    raise AssertionError(f"no {event} line in the log")


def test_a_clean_stop_replays_the_spool_before_exit(
    make_settings: Callable[..., Settings], beanstalkd: Beanstalkd, keyring: Keyring,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The server is above its high-water mark, so the running ingest keeps its spool;
    at SIGTERM it waits for the consumer (here the test) to drain the server and puts
    the spool into it before it exits."""
    settings = make_settings(queue_max_bytes=60_000)
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    result = Load(f"http://{settings.listen}", keyring, "stop", count=2000, rate=2000).start()
    done = result.wait()
    assert done.failed == 0
    spooled = metric(settings, "trackbuf_ingest_spool_events")
    assert spooled > 0, "nothing was spooled: the mark was never reached"
    # What an operator sees meanwhile: the events on this ingest's disk, and why.
    seen = status.gather(settings, f"http://{settings.admin_listen}", "", 0.1, max_age_s=3600)
    assert seen.spool_events == spooled and seen.servers_full == 1
    assert seen.spool_bytes == metric(settings, "trackbuf_ingest_spool_bytes") > 0
    assert any("above the high-water mark" in problem for problem in seen.problems)
    assert f"{spooled:,.0f} event(s)" in status.render(seen)
    taken: list[str] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            taken.extend(take_in_order(beanstalkd))
            time.sleep(0.05)

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        assert ingest.terminate() == 0
    finally:
        stop.set()
        consumer.join()
    taken += take_in_order(beanstalkd)
    assert sorted(taken) == sorted(sent.recipient for sent in done.acked)
    # Put there at the stop (the server stayed above its mark until the drain began).
    assert int(log_line(ingest.log(), "spool_replayed_at_exit")["events"]) > 0
    assert not list(Path(settings.spool_path).glob("*.spool"))


def test_a_spool_left_behind_is_logged_and_replayed_from_another_host(
    make_settings: Callable[..., Settings], beanstalkd: Beanstalkd, keyring: Keyring,
    tmp_path: Path,
) -> None:  # fmt: skip
    settings = make_settings()
    beanstalkd.stop()
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    done = Load(f"http://{settings.listen}", keyring, "left", count=300, rate=1000).start().wait()
    assert done.failed == 0
    assert ingest.terminate() == 0  # no server: it exits at once, spool kept
    left = log_line(ingest.log(), "spool_left_at_exit")
    assert left["events"] == "300" and left["dir"] == settings.spool_path
    assert left["reason"] == "no beanstalkd server reachable"

    # Another host: the directory, copied there, and that host's settings.
    moved = tmp_path / "from-the-old-host"
    Path(settings.spool_path).rename(moved)
    down = trackbuf(settings, "spool", "replay", "--dir", str(moved), "--timeout", "3")
    assert down.returncode == 1, down.stderr
    assert "300 event(s)" in down.stdout and "300 left" in down.stdout
    beanstalkd.start()
    replayed = trackbuf(settings, "spool", "replay", "--dir", str(moved))
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 300 event(s), 0 left" in replayed.stdout
    assert sorted(take_in_order(beanstalkd)) == sorted(sent.recipient for sent in done.acked)
    assert not list(moved.glob("*.spool"))
    missing = trackbuf(settings, "spool", "replay", "--dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
