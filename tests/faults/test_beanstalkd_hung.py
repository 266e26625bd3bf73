"""A beanstalkd that takes connections and never answers (SIGSTOP: the kernel still
completes TCP handshakes, as under memory pressure or a stuck disk) is reported as
hung, apart from one that is down, by ingest, by the consumer and by ``trackbuf
status``; and the report clears once it answers again."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from commands import status
from tests.faults.test_outages import metric, start_consumer
from tests.procs import start_ingest
from tests.servers import Beanstalkd
from trackbuf.settings import Settings

pytestmark = pytest.mark.faults


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def test_a_hung_beanstalkd_is_reported_hung_by_ingest_consumer_and_status(
    make_settings: Callable[..., Settings], beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    settings = make_settings()
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    consumer = start_consumer(settings, tmp_path / "consumer.log")
    ingest_url = f"http://{settings.admin_listen}"
    consumer_url = f"http://{settings.metrics_listen}"
    assert metric(settings, "trackbuf_ingest_beanstalkd_hung") == 0
    assert metric(settings, "trackbuf_queue_hung", consumer=True) == 0
    assert beanstalkd.proc is not None
    beanstalkd.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: metric(settings, "trackbuf_ingest_beanstalkd_hung") == 1, "ingest")
        wait_for(lambda: metric(settings, "trackbuf_queue_hung", consumer=True) == 1, "consumer")
        seen = status.gather(settings, ingest_url, consumer_url, interval=0.1, max_age_s=60)
        text = status.render(seen)
    finally:
        beanstalkd.proc.send_signal(signal.SIGCONT)
    assert seen.servers[0].hung and not seen.ok
    assert any("accepts connections but does not answer" in p for p in seen.problems)
    assert any("ingest finds 1 beanstalkd server(s) hung" in p for p in seen.problems)
    assert "(HUNG)" in text
    assert "event=beanstalkd_hung " in ingest.log()
    assert any("event=queue_scrape_failed " in line and " hung=True " in line
               for line in consumer.log().splitlines())  # fmt: skip
    # And it clears once the server answers again.
    wait_for(lambda: metric(settings, "trackbuf_ingest_beanstalkd_hung") == 0, "ingest clear")
    wait_for(lambda: metric(settings, "trackbuf_queue_hung", consumer=True) == 0, "consumer clear")
    assert "event=beanstalkd_answers_again " in ingest.log()
    # A server that is down is not hung.
    beanstalkd.kill()
    wait_for(lambda: metric(settings, "trackbuf_ingest_beanstalkd_up") == 0, "ingest down")
    seen = status.gather(settings, ingest_url, consumer_url, interval=0.1, max_age_s=60)
    assert not seen.servers[0].hung
    assert f"beanstalkd {beanstalkd.address} is unreachable" in seen.problems
    assert metric(settings, "trackbuf_ingest_beanstalkd_hung") == 0
