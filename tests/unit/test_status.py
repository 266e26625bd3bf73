"""``trackbuf status``: rates over the measured time between samples, and its usage errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from commands import main as cli
from commands.status import gather, render, scrape
from tests.servers import free_port
from trackbuf.settings import load

RATE = 1000.0  # events/s the fake pages report, whatever the scrapes cost
SLOW_S = 0.4


@pytest.fixture
def slow_metrics() -> Iterator[str]:
    """A /metrics page whose counters grow at exactly RATE per second of real time and
    that takes SLOW_S to answer, as a loaded ingest or consumer can."""
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(SLOW_S)
            count = RATE * (time.monotonic() - started)
            body = (
                f'trackbuf_ingest_events_total{{kind="open",outcome="queued"}} {count}\n'
                f"trackbuf_consumer_events_written_total {count}\n"
                "trackbuf_consumer_database_up 1\n"
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_rates_divide_by_the_measured_time_between_samples(slow_metrics: str) -> None:
    # Nothing listens on this port: status reports beanstalkd down and still the rates.
    settings = load({}, overrides={"beanstalkd": f"127.0.0.1:{free_port()}"})
    status = gather(settings, slow_metrics, slow_metrics, interval=0.1, max_age_s=60)
    assert status.beanstalkd_up is False
    # Between two samples of one page lie the sleep and three slow scrapes (~1.3 s),
    # not the 0.1 s asked for: dividing by 0.1 would report ~13x the real rate.
    assert status.events_in_per_s is not None and status.events_out_per_s is not None
    assert RATE * 0.8 < status.events_in_per_s < RATE * 1.2
    assert RATE * 0.8 < status.events_out_per_s < RATE * 1.2


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "inf", "soon"])
def test_a_useless_interval_is_a_usage_error(
    interval: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["status", "--interval", interval])
    assert exited.value.code == 2
    assert "--interval" in capsys.readouterr().err


def test_scrape_folds_labels_and_refuses_a_page_that_is_not_prometheus_text() -> None:
    pages = {
        "/good/metrics": (
            "# TYPE trackbuf_ingest_events_total counter\n"
            'trackbuf_ingest_events_total{kind="open",outcome="queued"} 3.0\n'
            'trackbuf_ingest_events_total{kind="click",outcome="queued"} 4.0\n'
            "trackbuf_ingest_spool_jobs 1.0\n"
        ),
        "/bad/metrics": "<html>not metrics</html>\n",
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages[self.path].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        totals = scrape(f"{base}/good")
        assert totals is not None
        assert totals["trackbuf_ingest_events_total"] == 7
        assert totals["trackbuf_ingest_spool_jobs"] == 1
        assert scrape(f"{base}/bad") is None
    finally:
        server.shutdown()
        server.server_close()


def consumer_page(reserves_per_s: float, jobs_per_s: float) -> Iterator[str]:
    """A consumer /metrics page whose reserve and job counters grow at these rates."""
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            elapsed = time.monotonic() - started
            body = (
                "trackbuf_consumer_database_up 1\n"
                f"trackbuf_consumer_reserve_commands_total {reserves_per_s * elapsed}\n"
                f"trackbuf_consumer_jobs_reserved_total {jobs_per_s * elapsed}\n"
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("reserves_per_s", "jobs_per_s", "polling"),
    [(1_100.0, 1_000.0, False), (40_000.0, 500.0, True), (4.0, 0.0, False)],
)
def test_status_shows_reserves_per_job_and_calls_polling_a_problem(
    reserves_per_s: float, jobs_per_s: float, polling: bool
) -> None:
    settings = load({}, overrides={"beanstalkd": f"127.0.0.1:{free_port()}"})
    for url in consumer_page(reserves_per_s, jobs_per_s):
        status = gather(settings, "", url, interval=0.3, max_age_s=60)
    assert status.reserves_per_s is not None
    assert reserves_per_s * 0.7 < status.reserves_per_s < reserves_per_s * 1.3
    if jobs_per_s:
        ratio = reserves_per_s / jobs_per_s
        assert status.reserves_per_job is not None
        assert ratio * 0.9 < status.reserves_per_job < ratio * 1.1
        assert "reserves per job" in render(status)
    else:
        assert status.reserves_per_job is None  # idle: no jobs to divide by
    assert any("polls beanstalkd" in p for p in status.problems) is polling
