"""deploy/nginx/trackbuf.conf in front of a real ingest: TLS, and the client's address.

Debian's nginx runs the shipped file with only its addresses and certificate paths
swapped for the test's (free ports, a certificate made here). A client on 127.0.0.2
fetches a pixel and a click over HTTPS through it, sending a forged X-Forwarded-For
of its own; ingest runs with TRACKBUF_TRUST_FORWARDED=1 and the stored rows must hold
127.0.0.2, the address nginx saw and appended, not the forged one and not nginx's.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.procs import Process, start_ingest
from tests.servers import free_port
from trackbuf import links
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent
CONF = ROOT / "deploy" / "nginx" / "trackbuf.conf"
CLIENT = "127.0.0.2"  # a loopback address of its own: what nginx sees and appends
FORGED = "192.0.2.66"  # what the client claims to be


def render(conf: str, ingest: str, http_port: int, https_port: int, cert: Path, key: Path) -> str:
    """The shipped file with the test's addresses; nothing else changes."""
    upstreams = re.findall(r"^\s*server \S+:8080 [^;]*;$", conf, re.M)
    assert len(upstreams) == 2, "the upstream block changed: update this test"
    out = conf.replace(upstreams[0], f"    server {ingest} max_fails=3 fail_timeout=10s;")
    out = out.replace(upstreams[1] + "\n", "")
    swaps = {
        "    listen 80;\n": f"    listen 127.0.0.1:{http_port};\n",
        "    listen 443 ssl http2;\n": f"    listen 127.0.0.1:{https_port} ssl http2;\n",
        "/etc/ssl/certs/t.example.com.pem": str(cert),
        "/etc/ssl/private/t.example.com.key": str(key),
    }
    for old, new in swaps.items():
        assert old in out, f"{old.strip()} is gone from {CONF.name}: update this test"
        out = out.replace(old, new)
    # This machine may have no IPv6 loopback; the v4 listeners carry the test.
    return re.sub(r"^\s*listen \[::\]:\d+[^;]*;\n", "", out, flags=re.M)


@pytest.fixture
def nginx(tmp_path: Path) -> tuple[Path, int, int]:
    if shutil.which("nginx") is None or shutil.which("openssl") is None:
        pytest.skip("needs nginx and openssl (apt-get install nginx-light openssl)")
    prefix = tmp_path / "nginx"
    (prefix / "logs").mkdir(parents=True)
    cert, key = prefix / "cert.pem", prefix / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=t.example.com", "-keyout", str(key),
         "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return prefix, free_port(), free_port()


def test_a_pixel_through_nginx_records_the_clients_address(
    make_settings, nginx: tuple[Path, int, int], keyring: Keyring, tmp_path: Path
) -> None:
    prefix, http_port, https_port = nginx
    settings = make_settings(trust_forwarded=True)
    ingest = start_ingest(settings, log_path=tmp_path / "ingest.log")
    cert, key = prefix / "cert.pem", prefix / "key.pem"
    site = prefix / "trackbuf.conf"
    site.write_text(render(CONF.read_text(), settings.listen, http_port, https_port, cert, key))
    main = prefix / "nginx.conf"
    # The main context a distribution's nginx.conf provides; the shipped file is included
    # in http {} as /etc/nginx/conf.d/ would include it.
    main.write_text(
        f"user root;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/logs/error.log;\nevents {{ worker_connections 64; }}\n"
        f"http {{ include {site}; }}\n"
    )
    command = ["nginx", "-p", str(prefix), "-c", str(main)]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    with open(prefix / "logs" / "stderr.log", "wb") as log:
        server = subprocess.Popen([*command, "-g", "daemon off;"], stderr=log)
    try:
        wait_listening(https_port, server)
        base = f"https://127.0.0.1:{https_port}"
        pixel = links.open_url(base, keyring, "proxy", "r1")
        click = links.click_url(base, keyring, "proxy", "r2", "https://shop.example/sale")
        answers = asyncio.run(
            fetch(
                [pixel, click, f"{base}/readyz", f"{base}/metrics",
                 f"http://127.0.0.1:{http_port}/o/x.gif"]
            )
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(10)
        ingest.terminate()
    assert answers[0][:2] == (200, "image/gif")
    assert answers[1][:2] == (302, "https://shop.example/sale")
    assert answers[2][0] == 200  # ingest's /readyz, through the proxy
    assert answers[3][0] == 404  # /metrics never goes through the public proxy
    assert answers[4] == (301, "https://127.0.0.1/o/x.gif")  # plain HTTP only redirects

    consumer = Process(settings, "consume", "--burst", log_path=tmp_path / "consume.log")
    assert consumer.proc.wait(60) == 0, consumer.log()
    rows = asyncio.run(stored(settings.database_url))
    assert rows == {("open", "r1", CLIENT), ("click", "r2", CLIENT)}


def wait_listening(port: int, server: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, "nginx exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nginx is not listening on {port}"
            time.sleep(0.05)


async def fetch(urls: list[str]) -> list[tuple[int, str]]:
    """(status, content type or Location) for each URL, from 127.0.0.1's sibling
    address, with a forged X-Forwarded-For."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test's own self-signed certificate
    connector = aiohttp.TCPConnector(local_addr=(CLIENT, 0), ssl=context)
    out = []
    async with aiohttp.ClientSession(connector=connector) as session:
        for url in urls:
            async with session.get(
                url, allow_redirects=False, headers={"X-Forwarded-For": FORGED}
            ) as response:
                await response.read()
                what = response.headers.get("Location") or response.content_type
                out.append((response.status, what))
    return out


async def stored(dsn: str) -> set[tuple[str, str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT kind, recipient, host(ip) AS ip FROM events")
    finally:
        await conn.close()
    return {(r["kind"], r["recipient"], r["ip"]) for r in rows}
