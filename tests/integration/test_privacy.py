"""Personal data through the real pipeline: what each IP and user-agent mode stores,
and what never reaches a log.

ingest -> beanstalkd -> consumer -> PostgreSQL, all real processes; the assertions read
the ``events`` rows an operator would query.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.conftest import KEYS, TEMPLATE
from tests.procs import Process, start_ingest
from tests.servers import Beanstalkd, Postgres
from trackbuf import links
from trackbuf.log import parse
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration

CLIENT_V4 = "127.0.0.2"  # a loopback address no server listens on
PROXY_HOPS_V4 = "203.0.113.9, 198.51.100.23"  # the last hop is what our proxy appended
FORWARDED_V4 = "198.51.100.23"
FORWARDED_V6 = "2001:db8:abcd:12:3456::7"
USER_AGENT = "Mozilla/5.0 (privacy test)"


async def hit(
    urls: list[str], headers: dict[str, str] | None = None, local_addr: str | None = None
) -> list[int]:
    connector = aiohttp.TCPConnector(local_addr=(local_addr, 0) if local_addr else None)
    async with aiohttp.ClientSession(connector=connector, headers=headers or {}) as session:
        out = []
        for url in urls:
            async with session.get(url, allow_redirects=False) as response:
                await response.read()
                out.append(response.status)
        return out


async def stored_rows(
    dsn: str, campaign: str, expected: int, timeout: float = 30
) -> dict[str, tuple[str | None, str | None, bool]]:
    """recipient -> (host(ip), user_agent, machine), once ``expected`` rows are stored."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncpg.connect(dsn)
            try:
                rows = await conn.fetch(
                    "SELECT recipient, host(ip) AS ip, user_agent, machine FROM events"
                    " WHERE campaign = $1",
                    campaign,
                )
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            rows = []
        if len(rows) >= expected or time.monotonic() > deadline:
            return {
                row["recipient"]: (row["ip"], row["user_agent"], row["machine"]) for row in rows
            }
        await asyncio.sleep(0.2)


# (TRACKBUF_IP_MODE, TRACKBUF_USER_AGENT_MODE) -> what the row holds for each client.
CASES: dict[tuple[str, str], dict[str, str | None]] = {
    ("full", "full"): {
        "socket-v4": CLIENT_V4,
        "socket-v6": "::1",
        "forwarded-v4": FORWARDED_V4,
        "forwarded-v6": FORWARDED_V6,
    },
    ("anonymize", "full"): {
        "socket-v4": "127.0.0.0",  # /24
        "socket-v6": "::",  # /48 of ::1
        "forwarded-v4": "198.51.100.0",
        "forwarded-v6": "2001:db8:abcd::",  # /48
    },
    ("drop", "drop"): {
        "socket-v4": None,
        "socket-v6": None,
        "forwarded-v4": None,
        "forwarded-v6": None,
    },
}


@pytest.mark.parametrize(("ip_mode", "user_agent_mode"), list(CASES))
def test_each_mode_stores_what_docs_security_says(
    make_settings, keyring: Keyring, tmp_path: Path, ip_mode: str, user_agent_mode: str
) -> None:
    """An IPv4 and an IPv6 socket client, and an IPv4 and IPv6 client behind a trusted
    proxy (X-Forwarded-For), each opening and clicking; the stored ``ip`` and
    ``user_agent`` per mode."""
    # One ingest behind a "proxy" on IPv4, one listening on [::1] taking clients directly.
    v4: Settings = make_settings(ip_mode=ip_mode, user_agent_mode=user_agent_mode,
                                 trust_forwarded=True)  # fmt: skip
    v6_listen = v4.listen.replace("127.0.0.1", "[::1]")
    v6: Settings = make_settings(ip_mode=ip_mode, user_agent_mode=user_agent_mode,
                                 listen=v6_listen)  # fmt: skip
    ingest_v4 = start_ingest(v4, tmp_path / "ingest-v4.log")
    ingest_v6 = start_ingest(v6, tmp_path / "ingest-v6.log")
    consumer = Process(v4, "consume", log_path=tmp_path / "consumer.log")
    campaign = f"privacy-{ip_mode}"

    def urls(base: str, client: str) -> list[str]:
        return [
            links.open_url(base, keyring, campaign, f"{client}-open"),
            links.click_url(base, keyring, campaign, f"{client}-click", "https://shop.example/"),
        ]

    ua = {"User-Agent": USER_AGENT}
    try:
        sent = asyncio.run(hit(urls(f"http://{v4.listen}", "socket-v4"), ua, CLIENT_V4))
        sent += asyncio.run(hit(urls(f"http://{v6.listen}", "socket-v6"), ua))
        for client, hops in (("forwarded-v4", PROXY_HOPS_V4), ("forwarded-v6", FORWARDED_V6)):
            headers = {**ua, "X-Forwarded-For": hops}
            sent += asyncio.run(hit(urls(f"http://{v4.listen}", client), headers))
        assert sent == [200, 302] * 4
        rows = asyncio.run(stored_rows(v4.database_url, campaign, expected=8))
    finally:
        consumer.terminate()
        ingest_v4.terminate()
        ingest_v6.terminate()
    expected_ua = USER_AGENT if user_agent_mode == "full" else None
    # A browser's fetch is a person's in every mode: with the agent dropped, nothing
    # says otherwise (no agent was *sent* only when the stored one is "").
    expected = {
        f"{client}-{kind}": (ip, expected_ua, False)
        for client, ip in CASES[(ip_mode, user_agent_mode)].items()
        for kind in ("open", "click")
    }
    assert rows == expected


FORGER = Keyring.parse("k1:not-the-real-secret-at-all-0123456")


def test_no_ip_token_or_key_in_any_log_through_outages(
    make_settings,
    beanstalkd: Beanstalkd,
    own_postgres: Postgres,
    keyring: Keyring,
    tmp_path: Path,
) -> None:
    """Default log level, full IP mode, a trusted proxy header: the logs of ingest and
    the consumer through forged, garbled and wrong-kind tokens, a request aiohttp cannot
    parse, beanstalkd killed (-9) and restarted, and PostgreSQL stopped and restarted,
    hold no client address, no token and no signing key."""
    settings: Settings = make_settings(
        database_url=own_postgres.dsn(TEMPLATE), trust_forwarded=True, threads=2
    )
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    consumer.wait_http(f"http://{settings.metrics_listen}/healthz")
    base = f"http://{settings.listen}"
    campaign = "logscan"
    headers = {"X-Forwarded-For": FORWARDED_V4, "User-Agent": USER_AGENT}

    def good(tag: str, n: int) -> list[str]:
        return [links.open_url(base, keyring, campaign, f"{tag}{i}") for i in range(n)] + [
            links.click_url(base, keyring, campaign, f"{tag}c{i}", "https://x.example/")
            for i in range(n)
        ]

    before = good("before", 5)
    forged = [links.click_url(base, FORGER, campaign, f"f{i}", "https://evil.example/")
              for i in range(3)]  # fmt: skip
    forged += [links.open_url(base, FORGER, campaign, "fo")]
    wrong_kind = [before[0].replace("/o/", "/c/").removesuffix(".gif")]
    garbled = [f"{base}/o/{'A' * 40}.gif", f"{base}/c/{'B' * 40}", before[6][:-7]]
    during_queue_outage = good("bsdown", 5)
    during_db_outage = good("dbdown", 5)

    async def unparsable() -> bytes:
        host, port = settings.listen.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=(CLIENT_V4, 0))
        token = before[1].rsplit("/", 1)[1]
        writer.write(f"GET /o/{token} HTTP/1.1\r\nHost: t\r\nno colon\r\n\r\n".encode())
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        return answer

    def send(urls: list[str]) -> list[int]:
        return asyncio.run(hit(urls, headers, CLIENT_V4))

    try:
        assert send(before) == [200] * 5 + [302] * 5
        assert send(forged) == [404] * 3 + [200]
        assert send(wrong_kind + garbled) == [404, 200, 404, 404]
        assert asyncio.run(unparsable()).split(b" ", 2)[1] == b"400"
        beanstalkd.kill()
        assert send(during_queue_outage) == [200] * 5 + [302] * 5  # spooled
        beanstalkd.start()  # same port, same binlog
        own_postgres.stop()
        assert send(during_db_outage) == [200] * 5 + [302] * 5  # queued in beanstalkd
        deadline = time.monotonic() + 20
        while "event=database_down" not in consumer.log():
            assert time.monotonic() < deadline, "the consumer did not notice the outage"
            time.sleep(0.2)
        own_postgres.start()
        rows = asyncio.run(stored_rows(settings.database_url, campaign, expected=30, timeout=60))
        assert len(rows) == 30
    finally:
        consumer.terminate()
        ingest.terminate()

    secrets = [entry.split(":", 1)[1] for entry in KEYS.split(",")]
    secrets.append("not-the-real-secret-at-all-0123456")
    all_urls = before + forged + wrong_kind + garbled + during_queue_outage + during_db_outage
    tokens = {url.rsplit("/", 1)[1].removesuffix(".gif") for url in all_urls}
    events: list[str] = []
    for proc in (ingest, consumer):
        text = proc.log()
        for line in text.splitlines():
            fields = parse(line)  # every line is key=value
            assert fields["level"] != "DEBUG", line  # default level
            events.append(fields["event"])
        for address in (CLIENT_V4, FORWARDED_V4):
            assert address not in text, f"{proc.args[0]} logged a client address"
        assert [t for t in tokens if t in text] == [], f"{proc.args[0]} logged a token"
        assert [s for s in secrets if s in text] == [], f"{proc.args[0]} logged a signing key"
    # The trouble happened and was logged, so the scan had something to scan.
    for event in ("bad_request", "beanstalkd_down", "spooling_started", "database_down",
                  "database_up", "ingest_stopped", "consumer_stopped"):  # fmt: skip
        assert event in events, (event, sorted(set(events)))


def test_7_a_forwarded_hop_written_with_a_port_is_stored_as_its_address(
    make_settings, keyring: Keyring, tmp_path: Path
) -> None:
    """Proxies that append ``ip:port`` or ``[v6]:port`` to X-Forwarded-For: the address
    is stored (the network rules need it), not NULL."""
    settings: Settings = make_settings(trust_forwarded=True)
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    hops = {"v4": "203.0.113.9, 198.51.100.23:51234", "v6": "[2001:db8:abcd::7]:443"}
    try:
        for name, hop in hops.items():
            url = links.open_url(f"http://{settings.listen}", keyring, "ports", name)
            headers = {"User-Agent": USER_AGENT, "X-Forwarded-For": hop}
            assert asyncio.run(hit([url], headers)) == [200]
        stored = asyncio.run(stored_rows(settings.database_url, "ports", expected=2))
    finally:
        consumer.terminate()
        ingest.terminate()
    assert stored == {
        "v4": ("198.51.100.23", USER_AGENT, False), "v6": ("2001:db8:abcd::7", USER_AGENT, False)
    }  # fmt: skip
