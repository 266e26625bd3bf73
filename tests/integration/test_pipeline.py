"""The whole pipeline against real servers: HTTP in, beanstalkd, consumer, PostgreSQL rows."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from consumer import run as consumer_run
from tests.procs import start_ingest, trackbuf
from tests.servers import Beanstalkd
from trackbuf import codec, links
from trackbuf.events import new_event
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration


async def fetch_rows(dsn: str, sql: str = "SELECT * FROM events") -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def rows(dsn: str, sql: str = "SELECT * FROM events") -> list[asyncpg.Record]:
    return asyncio.run(fetch_rows(dsn, sql))


def drain(settings: Settings, registry: CollectorRegistry | None = None) -> int:
    """Run the consumer in burst mode until the queue is empty."""
    return consumer_run.run(replace(settings, burst=True), threading.Event(), registry)


async def hit_all(urls: list[str], concurrency: int) -> list[tuple[int, str | None]]:
    """GET every URL with `concurrency` clients at once; (status, Location) for each."""
    results: list[tuple[int, str | None]] = [(0, None)] * len(urls)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(urls)):
        queue.put_nowait(i)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            async with session.get(urls[i], allow_redirects=False) as response:
                await response.read()
                results[i] = (response.status, response.headers.get("Location"))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return results


def test_2000_mixed_requests_from_concurrent_clients_are_stored_exactly_once(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    settings = make_settings(threads=4)
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    sent: Counter[tuple[str, str, str, str | None]] = Counter()
    urls = []
    for i in range(2000):
        campaign, recipient = f"camp-{i % 7}", f"user-{i}@example.com"
        if i % 3 == 0:
            target = f"https://shop.example/item/{i}?utm=mail"
            urls.append(links.click_url(settings.public_url, keyring, campaign, recipient, target))
            sent[("click", campaign, recipient, target)] += 1
        else:
            urls.append(links.open_url(settings.public_url, keyring, campaign, recipient))
            sent[("open", campaign, recipient, None)] += 1
    base = f"http://{settings.listen}"
    urls = [base + u.removeprefix(settings.public_url) for u in urls]
    try:
        answers = asyncio.run(hit_all(urls, concurrency=32))
    finally:
        assert ingest.terminate() == 0, ingest.log()

    for url, (status, location) in zip(urls, answers, strict=True):
        if "/c/" in url:
            assert status == 302 and location is not None and location.startswith("https://shop")
        else:
            assert status == 200
    assert drain(settings) == 0
    stored = rows(settings.database_url)
    assert len(stored) == 2000
    assert len({row["event_id"] for row in stored}) == 2000
    got = Counter((r["kind"], r["campaign"], r["recipient"], r["url"]) for r in stored)
    assert got == sent
    assert all(str(r["ip"]) == "127.0.0.1" for r in stored)
    assert beanstalkd.tube_stats()["current-jobs-ready"] == 0


def test_the_same_event_enqueued_twice_gives_one_row(make_settings, beanstalkd: Beanstalkd) -> None:
    settings = make_settings()
    event = codec.encode_event(new_event("open", "c", "r"))
    other = codec.encode_event(new_event("open", "c", "r2"))
    first, second = CollectorRegistry(), CollectorRegistry()
    with beanstalkd.client() as client:
        client.put(codec.encode_job([event]))
        client.put(codec.encode_job([event, other]))  # e.g. a spool replay after a put
    assert drain(settings, first) == 0
    assert len(rows(settings.database_url)) == 2
    # And again, in a later batch: still no second row.
    with beanstalkd.client() as client:
        client.put(codec.encode_job([event]))
    assert drain(settings, second) == 0
    assert len(rows(settings.database_url)) == 2
    # Skipped as duplicates by the insert itself, not refused and set aside: a unique
    # violation would also leave two rows, but as dead letters and a stuck operator.
    for registry, written in ((first, 2), (second, 0)):
        assert registry.get_sample_value("trackbuf_consumer_duplicate_events_total") == 1
        assert registry.get_sample_value("trackbuf_consumer_events_written_total") == written
    assert rows(settings.database_url, "SELECT * FROM dead_letters") == []


def test_a_job_whose_header_undercounts_its_events_is_stored_and_deleted(
    make_settings, beanstalkd: Beanstalkd, caplog: pytest.LogCaptureFixture
) -> None:
    """The header's count only sizes batches; the insert stores every event in the job.
    Three events under a header that says one made the consumer count -2 duplicates
    after the commit, which raised: the committed job was released and a database
    outage logged. Nothing after the commit may turn it into a failure."""
    settings = make_settings()
    events = [codec.encode_event(new_event("open", "c", f"r{i}")) for i in range(3)]
    body = codec.encode_job(events).replace(b'"n":3', b'"n":1', 1)
    assert codec.event_count(body) == 1
    registry = CollectorRegistry()
    with beanstalkd.client() as client:
        client.put(body)
    caplog.set_level(logging.INFO, logger="trackbuf")
    assert drain(settings, registry) == 0
    assert len(rows(settings.database_url)) == 3
    stats = beanstalkd.stats()
    assert (stats["cmd-delete"], stats["cmd-release"]) == (1, 0)  # deleted once, never retried
    assert beanstalkd.tube_stats()["current-jobs-ready"] == 0
    assert "event=database_down" not in caplog.text
    assert registry.get_sample_value("trackbuf_consumer_database_up") == 1
    assert registry.get_sample_value("trackbuf_consumer_events_written_total") == 3
    assert registry.get_sample_value("trackbuf_consumer_duplicate_events_total") == 0
    released = registry.get_sample_value("trackbuf_consumer_batches_total", {"outcome": "released"})
    assert released == 0


def test_four_threads_drain_a_prefilled_queue(make_settings, beanstalkd: Beanstalkd) -> None:
    settings = make_settings(threads=4, batch_size=500)
    with beanstalkd.client() as client:
        for j in range(200):
            events = [new_event("open", f"c{j % 5}", f"r{j}-{i}") for i in range(50)]
            client.put(codec.encode_job([codec.encode_event(e) for e in events]))
    assert drain(settings) == 0
    stored = rows(
        settings.database_url, "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events"
    )
    assert (stored[0]["n"], stored[0]["d"]) == (10_000, 10_000)
    stats = beanstalkd.tube_stats()
    assert stats["current-jobs-ready"] == 0 and stats["current-jobs-reserved"] == 0


def test_forged_click_redirects_nowhere_and_adds_nothing(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    settings = make_settings()
    base = f"http://{settings.listen}"
    forger = Keyring.parse("k1:an-attackers-own-secret-key-0123456789")  # right kid, wrong secret
    forged = links.click_url(base, forger, "c", "r", "https://evil.example/")
    # The same link signed with the real k1 (the second configured key): it differs from
    # the forgery only in its tag, so the forgery's 404 comes from the signature alone.
    (real_k1,) = [key for key in settings.signing_keys.split(",") if key.startswith("k1:")]
    genuine = links.click_url(base, Keyring.parse(real_k1), "c", "r", "https://evil.example/")
    assert genuine != forged and genuine.rsplit(".", 1)[0] == forged.rsplit(".", 1)[0]
    pixel_forged = links.open_url(base, forger, "c", "r")
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    try:
        answers = asyncio.run(hit_all([forged, forged[:-3], pixel_forged, genuine], concurrency=1))
        metrics = asyncio.run(hit_text(f"http://{settings.admin_listen}/metrics"))
    finally:
        ingest.terminate()
    forged_click, cut_click, (pixel_status, _), genuine_click = answers
    assert forged_click == (404, None)
    assert cut_click == (404, None)
    assert pixel_status == 200  # the pixel is served even for a bad token
    assert genuine_click == (302, "https://evil.example/")
    assert (
        'trackbuf_ingest_invalid_tokens_total{reason="bad_signature",route="click"} 1.0' in metrics
    )
    # The cut one: a tag of the wrong length is refused before any MAC is computed.
    assert 'trackbuf_ingest_invalid_tokens_total{reason="malformed",route="click"} 1.0' in metrics
    assert drain(settings) == 0
    stored = rows(settings.database_url)
    # Only the genuine click: the forged click and the forged pixel added nothing.
    assert [(r["kind"], r["campaign"], r["recipient"], r["url"]) for r in stored] == [
        ("click", "c", "r", "https://evil.example/")
    ]


async def hit_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


def test_pixel_headers_and_head_requests(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring
) -> None:
    settings = make_settings()
    url = links.open_url(f"http://{settings.listen}", keyring, "c", "r")
    ingest = start_ingest(settings)

    async def go() -> tuple[aiohttp.ClientResponse, bytes, int]:
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                body = await response.read()
            async with session.head(url) as head:
                return response, body, head.status

    try:
        response, body, head_status = asyncio.run(go())
    finally:
        ingest.terminate()
    assert response.status == 200 and head_status == 200
    assert response.headers["Content-Type"] == "image/gif"
    assert "no-store" in response.headers["Cache-Control"]
    assert response.headers["X-Robots-Tag"].startswith("noindex")
    assert len(body) == 43
    assert drain(settings) == 0
    assert len(rows(settings.database_url)) == 1  # HEAD answered, not recorded


def test_a_poison_job_does_not_block_its_batch(make_settings, beanstalkd: Beanstalkd) -> None:
    settings = make_settings(threads=1)
    good = [codec.encode_event(new_event("open", "c", f"r{i}")) for i in range(30)]
    bad_ip = codec.encode_event(new_event("open", "c", "bad", ip="999.1.1.1"))
    with beanstalkd.client() as client:
        client.put(codec.encode_job(good[:10]))
        client.put(b"this is not json")
        client.put(codec.encode_job([*good[10:20], bad_ip]))
        client.put(codec.encode_job(good[20:]))
    assert drain(settings) == 0
    assert len(rows(settings.database_url)) == 30
    dead = {
        bytes(r["body"]): r["reason"]
        for r in rows(settings.database_url, "SELECT * FROM dead_letters")
    }
    assert len(dead) == 2
    assert "not a trackbuf v1 frame" in dead[b"this is not json"]
    (bad_body,) = set(dead) - {b"this is not json"}
    assert b"999.1.1.1" in bad_body and "inet" in dead[bad_body]
    assert beanstalkd.tube_stats()["current-jobs-ready"] == 0


def test_an_event_too_big_for_an_index_is_set_aside_not_retried(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    """PostgreSQL refuses an index row over ~2.7 KB with SQLSTATE 54000 (program limit
    exceeded): a property of the data, so the event is a dead letter, not an outage."""
    import secrets

    settings = make_settings(threads=1)
    huge = secrets.token_urlsafe(6000)  # random text: TOAST cannot compress it under the limit
    good = [codec.encode_event(new_event("open", "c", f"r{i}")) for i in range(5)]
    with beanstalkd.client() as client:
        client.put(codec.encode_job([*good, codec.encode_event(new_event("open", huge, "x"))]))
    assert drain(settings) == 0
    assert len(rows(settings.database_url)) == 5
    (dead,) = rows(settings.database_url, "SELECT reason FROM dead_letters")
    assert dead["reason"].startswith("54000")
    stats = beanstalkd.tube_stats()
    assert stats["current-jobs-ready"] == 0 and stats["current-jobs-reserved"] == 0


def test_migrate_is_idempotent(make_settings) -> None:
    settings = make_settings()
    first = trackbuf(settings, "migrate")
    second = trackbuf(settings, "migrate")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "schema is current" in second.stdout


def test_oversized_requests_get_a_clear_error_and_the_server_carries_on(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring
) -> None:
    settings = make_settings()
    url = links.open_url(f"http://{settings.listen}", keyring, "c", "big")
    ingest = start_ingest(settings)

    async def go() -> tuple[int, int, int]:
        async with aiohttp.ClientSession() as session:
            async with session.get(url, headers={"User-Agent": "x" * 20_000}) as huge_header:
                first = huge_header.status
            async with session.get(url.replace(".gif", "x" * 9000 + ".gif")) as huge_line:
                second = huge_line.status
            async with session.get(url) as fine:
                return first, second, fine.status

    try:
        huge_header, huge_line, fine = asyncio.run(go())
    finally:
        assert ingest.terminate() == 0
    assert 400 <= huge_header < 500 and 400 <= huge_line < 500
    assert fine == 200
    assert drain(settings) == 0
    assert len(rows(settings.database_url)) == 1


def test_a_user_agent_that_is_not_utf8_is_stored_not_lost(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring
) -> None:
    import socket

    settings = make_settings()
    path = links.open_url("", keyring, "c", "latin1")
    ingest = start_ingest(settings)
    host, port = settings.listen.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
                + b"User-Agent: caf\xe9 mail\r\n\r\n"
            )
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    finally:
        assert ingest.terminate() == 0
    assert answer.startswith(b"HTTP/1.1 200")
    assert drain(settings) == 0
    (row,) = rows(settings.database_url)
    assert row["user_agent"] == "caf\ufffd mail"


def test_stats_counts_totals_uniques_and_machines(make_settings, beanstalkd: Beanstalkd) -> None:
    import json

    settings = make_settings()
    proxy = "Mozilla/5.0 (via ggpht.com GoogleImageProxy)"
    events = [
        new_event("open", "spring", "a", user_agent="Mozilla/5.0 (iPhone)"),
        new_event("open", "spring", "a", user_agent="Mozilla/5.0 (iPhone)"),
        new_event("open", "spring", "b", user_agent=proxy),
        new_event("click", "spring", "a", url="https://x.example/", user_agent="Mozilla/5.0"),
        new_event("open", "autumn", "c"),
    ]
    with beanstalkd.client() as client:
        client.put(codec.encode_job([codec.encode_event(e) for e in events]))
    assert drain(settings) == 0
    shown = trackbuf(settings, "stats", "--campaign", "spring", "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    keys = ("total", "unique_recipients", "machine_total", "human_unique_recipients",
            "proxied_total")  # fmt: skip
    opens = {k: report["open"][k] for k in keys}
    # b's open came through Gmail's image proxy: a person's, shown as proxied.
    assert opens == {"total": 3, "unique_recipients": 2, "machine_total": 0,
                     "human_unique_recipients": 2, "proxied_total": 1}  # fmt: skip
    assert report["click"]["total"] == 1 and report["click"]["unique_recipients"] == 1
    human = trackbuf(settings, "stats", "--campaign", "spring")
    assert "opens" in human.stdout and "clicks" in human.stdout
