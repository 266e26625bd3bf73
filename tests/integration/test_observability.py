"""What operators see: /metrics values after real traffic, status, health and readiness."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from consumer.queue_metrics import QueueCollector
from ingest.app import TALLY_FLUSH_S, Ingest
from ingest.server import ErrorAnswers
from loadtest.bench import scrape
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


def start_both(settings: Settings, tmp_path: Path) -> tuple[Process, Process]:
    """A real ingest and consumer, logging to tmp_path, both answering."""
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    consumer.wait_http(f"http://{settings.metrics_listen}/healthz")
    return ingest, consumer


def queue_up(settings: Settings) -> str:
    """The key of the consumer's trackbuf_queue_up sample for the (one) server."""
    return f'trackbuf_queue_up{{server="{settings.beanstalkd}"}}'


def test_metrics_count_real_traffic(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    settings: Settings = make_settings(threads=2)
    ingest, consumer = start_both(settings, tmp_path)
    base = f"http://{settings.listen}"
    forger = Keyring.parse("k1:not-the-real-secret-at-all-0123456789")
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
    ing, con = scrape(settings.admin_listen), scrape(settings.metrics_listen)
    assert consumer.terminate() == 0 and ingest.terminate() == 0

    assert ing['trackbuf_ingest_requests_total{outcome="queued",route="open"}'] == 50
    assert ing['trackbuf_ingest_requests_total{outcome="queued",route="click"}'] == 20
    assert ing['trackbuf_ingest_requests_total{outcome="invalid_token",route="click"}'] == 5
    assert ing['trackbuf_ingest_invalid_tokens_total{reason="bad_signature",route="click"}'] == 5
    assert ing['trackbuf_ingest_events_total{kind="open",outcome="queued"}'] == 50
    assert ing['trackbuf_ingest_request_duration_seconds_count{route="open"}'] == 50
    assert ing['trackbuf_ingest_request_duration_seconds_bucket{le="+Inf",route="click"}'] == 25
    assert ing["trackbuf_ingest_job_events_sum"] == 70  # every event went into some job
    assert ing[f'trackbuf_ingest_beanstalkd_up{{server="{beanstalkd.address}"}}'] == 1
    assert ing["trackbuf_ingest_beanstalkd_servers_up"] == 1
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
    server = f'server="{settings.beanstalkd}"'
    assert con[f"trackbuf_queue_up{{{server}}}"] == 1
    assert con[f'trackbuf_queue_jobs{{{server},state="ready",tube="trackbuf-events"}}'] == 0
    assert con[f'trackbuf_queue_consumers{{{server},tube="trackbuf-events"}}'] == 2


def test_status_shows_depth_and_age_and_fails_when_unwell(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    settings: Settings = make_settings()
    first_put = time.monotonic()
    with beanstalkd.client() as client:
        for i in range(30):
            client.put(codec.encode_job([codec.encode_event(new_event("open", "s", f"r{i}"))]))
    time.sleep(2.1)  # beanstalkd ages jobs in whole seconds
    shown = trackbuf(settings, "status", "--json", "--interval", "0.2", "--max-age", "1",
                     "--ingest-url", "", "--consumer-url", "")  # fmt: skip
    # The age is whole seconds since the oldest put, read before status returned.
    age_limit = int(time.monotonic() - first_put)
    report = json.loads(shown.stdout)
    assert shown.returncode == 1
    assert report["jobs"]["ready"] == 30
    assert 2 <= report["oldest_ready_age_s"] <= age_limit, (report, age_limit)
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


def requests_per_worker(metrics_dir: Path) -> dict[str, float]:
    """trackbuf_ingest_requests_total as each worker process counted it (its own file
    in the multiprocess directory, named after its pid)."""
    counts = {}
    for path in sorted(metrics_dir.glob("counter_*.db")):
        total = 0.0
        for metric in MultiProcessCollector.merge([str(path)], accumulate=True):
            if metric.name == "trackbuf_ingest_requests":
                total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        counts[path.stem.removeprefix("counter_")] = total
    return counts


def test_several_ingest_workers_report_correct_totals(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    settings: Settings = make_settings(workers=2, data_dir=str(tmp_path / "data"))
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    base = f"http://{settings.listen}"
    urls = [links.open_url(base, keyring, "w", f"r{i}") for i in range(300)]

    async def hit() -> list[int]:
        # A new connection per request: the kernel spreads connections, not requests,
        # across the two processes (whichever is free accepts), and keep-alive would pin a client
        # to one of them.
        connector = aiohttp.TCPConnector(force_close=True, limit=8)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(url: str) -> int:
                async with session.get(url) as response:
                    await response.read()
                    return response.status

            return await asyncio.gather(*(one(url) for url in urls))

    try:
        time.sleep(1.0)  # both workers listening
        assert asyncio.run(hit()) == [200] * 300
        # Each process adds its per-request tally to the shared files every second: the
        # one answering a scrape may report the other up to that much late, not wrong.
        time.sleep(TALLY_FLUSH_S + 0.3)
        totals = set()
        for _ in range(6):  # each scrape may land on either process
            ing = scrape(settings.admin_listen)
            totals.add(
                sum(v for k, v in ing.items() if k.startswith("trackbuf_ingest_requests_total"))
            )
        assert totals == {300.0}
        # Both workers served traffic, and the page adds up what each one counted.
        per_worker = requests_per_worker(Path(settings.data_dir) / "ingest-metrics")
    finally:
        assert ingest.terminate() == 0
    children = [line for line in ingest.log().splitlines() if "event=ingest_listening" in line]
    pids = {parse(line)["pid"] for line in children}
    assert len(pids) == 2
    assert set(per_worker) == pids, (per_worker, pids)
    assert all(count > 0 for count in per_worker.values()), per_worker
    assert sum(per_worker.values()) == 300


def test_a_hung_beanstalkd_does_not_hang_the_consumer_metrics(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    settings: Settings = make_settings(threads=1)
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    # Ready: the worker has seen the database up (on a loaded machine /healthz can
    # answer before that, and a worker then stuck on the hung beanstalkd never looks).
    consumer.wait_http(f"http://{settings.metrics_listen}/readyz")
    assert scrape(settings.metrics_listen)[queue_up(settings)] == 1
    assert beanstalkd.proc is not None
    # Stopped, not dead: the kernel still accepts connections, nothing ever answers.
    beanstalkd.proc.send_signal(signal.SIGSTOP)
    try:
        for _ in range(2):
            started = time.monotonic()
            con = scrape(settings.metrics_listen)
            assert time.monotonic() - started < 2.0, "the queue scrape must give up in ~1 s"
            assert con[queue_up(settings)] == 0
            assert con["trackbuf_consumer_database_up"] == 1  # the rest still answers
    finally:
        beanstalkd.proc.send_signal(signal.SIGCONT)
    assert scrape(settings.metrics_listen)[queue_up(settings)] == 1
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
    counter = ErrorAnswers(ingest.metrics)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/bug":
            raise RuntimeError("a bug in a handler")
        return await ingest.handle(request)

    async def run() -> tuple[list[int], bytes]:
        await ingest.start()
        runner = web.ServerRunner(web.Server(handle, access_log=None))  # as server.py
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        statuses = []
        try:
            async with aiohttp.ClientSession() as session:
                for path in ("/bug", "/bug", "/readyz", "/healthz", "/c/forged"):
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

    aiohttp_log = logging.getLogger("aiohttp.server")
    aiohttp_log.addFilter(counter)  # what ingest/server.py installs
    try:
        statuses, raw = asyncio.run(run())
    finally:
        aiohttp_log.removeFilter(counter)
    assert statuses == [500, 500, 503, 200, 404]
    assert raw.split(b" ", 2)[1] == b"400"

    def errors(code: str) -> float | None:
        return ingest.registry.get_sample_value("trackbuf_ingest_http_errors_total", {"code": code})

    assert errors("500") == 2
    assert errors("503") is None  # the /readyz 503 is a probe's answer, not a failure
    assert errors("400") == 1
    assert errors("404") is None  # a forged token is counted by invalid_tokens instead


def test_a_real_ingest_counts_the_requests_it_could_not_parse(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    settings: Settings = make_settings()
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    host, port = settings.listen.rsplit(":", 1)

    async def malformed() -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /o/x.gif HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n")
        raw = await reader.read()
        writer.close()
        await writer.wait_closed()
        return raw

    try:
        raws = [asyncio.run(malformed()) for _ in range(3)]
        samples = scrape(settings.admin_listen)
    finally:
        assert ingest.terminate() == 0
    assert [raw.split(b" ", 2)[1] for raw in raws] == [b"400"] * 3
    assert samples['trackbuf_ingest_http_errors_total{code="400"}'] == 3
    assert "event=bad_request status=400" in ingest.log()
    bad = [line for line in ingest.log().splitlines() if "event=bad_request" in line]
    assert len(bad) == 3 and not any("127.0.0.1" in line for line in bad)  # no client address


CLIENT_IP = "127.0.0.2"  # loopback too, but not the address any server listens on
FORWARDED_IP = "198.51.100.23"


def test_logs_are_one_key_value_event_per_line_without_tokens_or_ips(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    """Real processes through real trouble (forged and garbled tokens, a malformed
    request, a beanstalkd outage): every line both write parses as key=value."""
    settings: Settings = make_settings(threads=2)
    ingest, consumer = start_both(settings, tmp_path)
    base = f"http://{settings.listen}"
    forger = Keyring.parse("k1:not-the-real-secret-at-all-0123456789")
    good = [links.open_url(base, keyring, "logs", f"o{i}") for i in range(10)]
    good += [
        links.click_url(base, keyring, "logs", f"c{i}", "https://x.example/") for i in range(5)
    ]
    bad = [
        links.click_url(base, forger, "logs", f"f{i}", "https://evil.example/") for i in range(5)
    ]
    bad += [f"{base}/o/{'A' * 40}.gif", f"{base}/c/{'B' * 40}"]
    during_outage = [links.open_url(base, keyring, "logs", f"late{i}") for i in range(10)]

    async def hit(urls: list[str]) -> list[int]:
        # From another loopback address, with a forwarded-for header ingest does not
        # trust: neither address may reach a log.
        connector = aiohttp.TCPConnector(local_addr=(CLIENT_IP, 0))
        headers = {"X-Forwarded-For": FORWARDED_IP}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            out = []
            for url in urls:
                async with session.get(url, allow_redirects=False) as response:
                    out.append(response.status)
            return out

    async def malformed() -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", int(settings.listen.rsplit(":", 1)[1]), local_addr=(CLIENT_IP, 0)
        )
        writer.write(f"GET /o/{'C' * 40}.gif HTTP/1.1\r\nHost: t\r\nno colon\r\n\r\n".encode())
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        return answer

    assert asyncio.run(hit(good)) == [200] * 10 + [302] * 5
    assert asyncio.run(hit(bad)) == [404] * 5 + [200, 404]
    assert asyncio.run(malformed()).split(b" ", 2)[1] == b"400"
    beanstalkd.stop()
    assert asyncio.run(hit(during_outage)) == [200] * 10  # spooled
    for _ in range(2):
        assert scrape(settings.metrics_listen)[queue_up(settings)] == 0
    beanstalkd.start()
    deadline = time.monotonic() + 30
    while scrape(settings.metrics_listen).get("trackbuf_consumer_events_written_total", 0) < 25:
        assert time.monotonic() < deadline, "the spooled events were not stored"
        time.sleep(0.2)
    assert consumer.terminate() == 0 and ingest.terminate() == 0

    tokens = {url.rsplit("/", 1)[1].removesuffix(".gif") for url in good + bad + during_outage}
    seen: list[str] = []
    for proc in (ingest, consumer):
        text = proc.log()
        for line in text.splitlines():
            fields = parse(line)  # raises on anything that is not key=value
            assert list(fields)[:4] == ["ts", "level", "logger", "event"], line
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["ts"])
            assert fields["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
            seen.append(fields["event"])
        assert CLIENT_IP not in text and FORWARDED_IP not in text
        leaked = [token for token in tokens if token in text]
        assert leaked == [], f"{proc.args[0]} logged tokens"
    # The trouble above was logged (so the checks had something to check).
    for event in ("bad_request", "spooling_started", "queue_scrape_failed",
                  "queue_scrape_recovered", "consumer_stopped", "ingest_stopped"):  # fmt: skip
        assert event in seen, (event, seen)


def test_binlog_span_is_what_beanstalkd_reports(tmp_path: Path) -> None:
    # 10 kB binlog files: 100 jobs of 1 kB stay ready and keep a dozen files alive.
    server = Beanstalkd(tmp_path / "small-binlog", "-s", "10000").start()
    try:
        with server.client() as client:
            for _ in range(100):
                client.put(b"x" * 1000)
            stats = client.stats()
        registry = CollectorRegistry()
        QueueCollector([("127.0.0.1", server.port)], "trackbuf-events").register(registry)
        # Each read is a scrape, so read while the server runs.
        labels = {"server": server.address}
        span = registry.get_sample_value("trackbuf_queue_binlog_span_files", labels)
        ready = {**labels, "tube": "trackbuf-events", "state": "ready"}
        assert registry.get_sample_value("trackbuf_queue_jobs", ready) == 100
    finally:
        server.kill()
    expected = int(stats["binlog-current-index"]) - int(stats["binlog-oldest-index"])
    assert expected >= 5, stats  # the files really are pinned by live jobs
    assert span == expected
