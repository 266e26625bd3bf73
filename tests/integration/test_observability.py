"""What operators see: /metrics values after real traffic, status, health and readiness."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ingest.app import Ingest
from ingest.metrics import error_counter
from loadtest.bench import scrape
from tests.load import Load
from tests.procs import Process, start_ingest, trackbuf
from tests.servers import Beanstalkd, free_port
from trackbuf import codec, links
from trackbuf.events import new_event
from trackbuf.log import parse
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def test_metrics_count_real_traffic(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    settings: Settings = make_settings(threads=2)
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    consumer.wait_http(f"http://{settings.metrics_listen}/healthz")
    base = f"http://{settings.listen}"
    forger = Keyring.parse("k1:not-the-real-secret-at-all")
    urls = [links.open_url(base, keyring, "m", f"o{i}") for i in range(50)]
    urls += [links.click_url(base, keyring, "m", f"c{i}", "https://x.example/") for i in range(20)]
    urls += [links.click_url(base, forger, "m", f"f{i}", "https://evil.example/") for i in range(5)]

    async def hit() -> list[int]:
        async with aiohttp.ClientSession() as session:
            out = []
            for url in urls:
                async with session.get(url, allow_redirects=False) as response:
                    out.append(response.status)
            return out

    statuses = asyncio.run(hit())
    assert statuses.count(200) == 50 and statuses.count(302) == 20 and statuses.count(404) == 5
    deadline = time.monotonic() + 20
    while scrape(settings.metrics_listen).get("trackbuf_consumer_events_written_total", 0) < 70:
        assert time.monotonic() < deadline, "consumer did not store the events"
        time.sleep(0.1)
    ing, con = scrape(settings.listen), scrape(settings.metrics_listen)
    assert consumer.terminate() == 0 and ingest.terminate() == 0

    assert ing['trackbuf_ingest_requests_total{outcome="queued",route="open"}'] == 50
    assert ing['trackbuf_ingest_requests_total{outcome="queued",route="click"}'] == 20
    assert ing['trackbuf_ingest_requests_total{outcome="invalid_token",route="click"}'] == 5
    assert ing['trackbuf_ingest_invalid_tokens_total{reason="bad_signature",route="click"}'] == 5
    assert ing['trackbuf_ingest_events_total{kind="open",outcome="queued"}'] == 50
    assert ing['trackbuf_ingest_request_duration_seconds_count{route="open"}'] == 50
    assert ing['trackbuf_ingest_request_duration_seconds_bucket{le="+Inf",route="click"}'] == 25
    assert ing["trackbuf_ingest_job_events_sum"] == 70  # every event went into some job
    assert ing["trackbuf_ingest_beanstalkd_up"] == 1
    assert ing["trackbuf_ingest_spool_jobs"] == 0
    # Error counters exist at 0 from the start, so the first error shows in increase().
    assert ing['trackbuf_ingest_http_errors_total{code="500"}'] == 0
    assert ing['trackbuf_ingest_http_errors_total{code="400"}'] == 0

    assert con["trackbuf_consumer_events_written_total"] == 70
    assert con["trackbuf_consumer_duplicate_events_total"] == 0
    assert con["trackbuf_consumer_batch_events_sum"] == 70
    assert con["trackbuf_consumer_end_to_end_latency_seconds_count"] == 70
    assert con['trackbuf_consumer_end_to_end_latency_seconds_bucket{le="+Inf"}'] == 70
    # Sequential requests with a 50 ms linger: every event is stored within seconds.
    assert con['trackbuf_consumer_end_to_end_latency_seconds_bucket{le="5.0"}'] == 70
    assert con["trackbuf_consumer_database_up"] == 1
    assert con["trackbuf_consumer_buried_jobs_total"] == 0
    assert con["trackbuf_consumer_kicked_jobs_total"] == 0
    assert con["trackbuf_queue_up"] == 1
    assert con['trackbuf_queue_jobs{state="ready",tube="trackbuf-events"}'] == 0
    assert con['trackbuf_queue_consumers{tube="trackbuf-events"}'] == 2


def test_status_shows_depth_and_age_and_fails_when_unwell(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    settings: Settings = make_settings()
    with beanstalkd.client() as client:
        for i in range(30):
            client.put(codec.encode_job([codec.encode_event(new_event("open", "s", f"r{i}"))]))
    time.sleep(2.1)  # beanstalkd ages jobs in whole seconds
    shown = trackbuf(settings, "status", "--json", "--interval", "0.2", "--max-age", "1",
                     "--ingest-url", "", "--consumer-url", "")  # fmt: skip
    report = json.loads(shown.stdout)
    assert shown.returncode == 1
    assert report["jobs"]["ready"] == 30 and report["oldest_ready_age_s"] >= 2
    assert report["consumers"] == 0
    assert "jobs are waiting and no consumer is connected" in report["problems"]

    consumer = Process(replace(settings, burst=True), "consume")
    assert consumer.proc.wait(30) == 0
    shown = trackbuf(settings, "status", "--json", "--interval", "0.2",
                     "--ingest-url", "", "--consumer-url", "")  # fmt: skip
    report = json.loads(shown.stdout)
    assert shown.returncode == 0, report["problems"]
    assert report["jobs"]["ready"] == 0 and report["ok"] is True

    human = trackbuf(settings, "status", "--interval", "0.1", "--ingest-url", "",
                     "--consumer-url", "")  # fmt: skip
    assert "ready 0" in human.stdout and human.stdout.rstrip().endswith("OK")


def test_status_fails_when_beanstalkd_is_down(make_settings, beanstalkd: Beanstalkd) -> None:
    settings: Settings = make_settings()
    beanstalkd.stop()
    shown = trackbuf(settings, "status", "--json", "--interval", "0.1",
                     "--ingest-url", "", "--consumer-url", "")  # fmt: skip
    assert shown.returncode == 1
    assert json.loads(shown.stdout)["beanstalkd_up"] is False


def test_readiness_follows_the_dependencies(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    settings: Settings = make_settings(spool_max_bytes=1000)
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    try:
        assert asyncio.run(get(f"http://{settings.listen}/readyz"))[0] == 200
        beanstalkd.stop()
        deadline = time.monotonic() + 10
        # A 1000-byte spool has no room for a full job: not ready any more.
        while asyncio.run(get(f"http://{settings.listen}/readyz"))[0] != 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert asyncio.run(get(f"http://{settings.listen}/healthz"))[0] == 200  # alive
    finally:
        ingest.terminate()


def test_several_ingest_workers_report_correct_totals(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    settings: Settings = make_settings(workers=2, data_dir=str(tmp_path / "data"))
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    try:
        # Two processes behind one port: fresh connections spread across both.
        time.sleep(1.0)
        result = Load(f"http://{settings.listen}", keyring, "w", count=300, rate=600,
                      concurrency=8).start().wait()  # fmt: skip
        assert result.failed == 0
        totals = set()
        for _ in range(6):  # each scrape may land on either process
            ing = scrape(settings.listen)
            totals.add(
                sum(v for k, v in ing.items() if k.startswith("trackbuf_ingest_requests_total"))
            )
        assert totals == {300.0}
    finally:
        assert ingest.terminate() == 0
    children = [line for line in ingest.log().splitlines() if "event=ingest_listening" in line]
    assert len({line.split("pid=")[1] for line in children}) == 2


def test_a_hung_beanstalkd_does_not_hang_the_consumer_metrics(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    settings: Settings = make_settings(threads=1)
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    consumer.wait_http(f"http://{settings.metrics_listen}/healthz")
    assert scrape(settings.metrics_listen)["trackbuf_queue_up"] == 1
    assert beanstalkd.proc is not None
    # Stopped, not dead: the kernel still accepts connections, nothing ever answers.
    beanstalkd.proc.send_signal(signal.SIGSTOP)
    try:
        for _ in range(2):
            started = time.monotonic()
            con = scrape(settings.metrics_listen)
            assert time.monotonic() - started < 2.0, "the queue scrape must give up in ~1 s"
            assert con["trackbuf_queue_up"] == 0
            assert con["trackbuf_consumer_database_up"] == 1  # the rest still answers
    finally:
        beanstalkd.proc.send_signal(signal.SIGCONT)
    assert scrape(settings.metrics_listen)["trackbuf_queue_up"] == 1
    assert consumer.terminate() == 0
    # Logged when the outage starts and when it ends, not on every scrape.
    events = [parse(line)["event"] for line in consumer.log().splitlines()]
    assert events.count("queue_scrape_failed") == 1, events
    assert events.count("queue_scrape_recovered") == 1, events


def test_error_answers_are_counted_by_status_code(make_settings, tmp_path: Path) -> None:
    # beanstalkd unreachable and no room in the spool: /readyz answers 503 on purpose.
    settings: Settings = make_settings(beanstalkd=f"127.0.0.1:{free_port()}", spool_max_bytes=1000)
    port = free_port()
    ingest = Ingest(settings)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/bug":
            raise RuntimeError("a bug in a handler")
        if request.path == "/busy":
            return web.Response(status=503, text="busy")
        return await ingest.handle(request)

    async def run() -> tuple[list[int], bytes]:
        await ingest.start()
        # As ingest/server.py serves it, with the error counter as its access logger.
        server = web.Server(
            handle,
            access_log=logging.getLogger("test.access"),
            access_log_class=error_counter(ingest.metrics),
        )
        runner = web.ServerRunner(server)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        statuses = []
        try:
            async with aiohttp.ClientSession() as session:
                for path in ("/bug", "/bug", "/busy", "/readyz", "/healthz", "/c/forged"):
                    async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                        statuses.append(response.status)
            # A header line without a colon: aiohttp answers 400 before any handler runs.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /o/x.gif HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n")
            raw = await reader.read()
            writer.close()
            await writer.wait_closed()
        finally:
            await runner.cleanup()
            await ingest.close()
        return statuses, raw

    statuses, raw = asyncio.run(run())
    assert statuses == [500, 500, 503, 503, 200, 404]
    assert raw.split(b" ", 2)[1] == b"400"

    def errors(code: str) -> float | None:
        return ingest.registry.get_sample_value("trackbuf_ingest_http_errors_total", {"code": code})

    assert errors("500") == 2
    assert errors("503") == 1  # /busy only: the /readyz 503 is a probe's answer
    assert errors("400") == 1
    assert errors("404") is None  # a forged token is counted by invalid_tokens instead
