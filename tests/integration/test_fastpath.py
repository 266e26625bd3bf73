"""Ingest's fast path, against real ingest processes and a real beanstalkd.

What a user of ingest must not be able to tell: with the fast path on (the default) or
off (``TRACKBUF_FAST_PATH=0``: aiohttp answers everything), the same request gets the
same answer and queues the same event. And what the fast path must survive on one
connection: requests it hands to aiohttp mid-connection, pipelined and split requests,
many requests in a row, and a graceful stop with clients still connected.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import greenstalk
import pytest

from ingest.app import Ingest
from ingest.fastpath import FastServer
from ingest.pixel import GIF
from tests.procs import Process, start_ingest
from tests.servers import Beanstalkd, free_port
from trackbuf import codec, links
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration

UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15"


class Answer:
    def __init__(self, status: str, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def comparable(self) -> tuple[str, dict[str, str], bytes]:
        """Without what differs between any two answers (Date) or names the server,
        and without the Content-Type of an empty body (aiohttp 3.9 adds one to the
        redirect, later releases do not: it describes nothing)."""
        dropped = ("date", "server") if self.body else ("date", "server", "content-type")
        kept = {k: v for k, v in self.headers.items() if k not in dropped}
        return self.status, kept, self.body


class Client:
    """A raw HTTP/1.x connection: bytes out exactly as written, answers read back."""

    def __init__(self, listen: str) -> None:
        host, port = listen.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self, to_head: bool = False) -> Answer:
        """The next answer; ``to_head``: to a HEAD request (no body, whatever the length)."""
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        top, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status, *lines = top.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        length = 0 if to_head else int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._read()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Answer(status, headers, body)

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection before answering"
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def get(path: str, *headers: str, version: str = "HTTP/1.1", method: str = "GET") -> bytes:
    lines = [f"{method} {path} {version}", "Host: t.example", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def queued(server: Beanstalkd) -> list[tuple[str, str, str | None, str | None, str | None]]:
    """(kind, recipient, url, user agent, ip) of every queued event, sorted; deleted.
    Read with greenstalk, not trackbuf's own client."""
    found = []
    with greenstalk.Client(("127.0.0.1", server.port), encoding=None) as client:
        client.watch("trackbuf-events")
        while True:
            try:
                job = client.reserve(timeout=0)
            except greenstalk.TimedOutError:
                return sorted(found, key=repr)
            for e in codec.decode_job(bytes(job.body)):
                found.append((e.kind, e.recipient, e.url, e.user_agent, e.ip))
            client.delete(job)


@pytest.fixture
def two_ingests(make_settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The same settings twice, the fast path on in one and off in the other."""
    started: list[tuple[Process, Settings]] = []
    try:
        for fast in (True, False):
            name = "fast" if fast else "aiohttp"
            settings: Settings = make_settings(
                fast_path=fast, listen=f"127.0.0.1:{free_port()}",
                admin_listen=f"127.0.0.1:{free_port()}", spool_dir=str(tmp_path / name),
                redirect_hosts="shop.example",
            )  # fmt: skip
            started.append((start_ingest(settings, tmp_path / f"{name}.log"), settings))
        yield [s for _, s in started]
    finally:
        for proc, _ in started:
            assert proc.terminate() == 0, proc.log()


def test_every_request_gets_the_same_answer_and_event_with_the_fast_path_or_without(
    two_ingests: list[Settings], beanstalkd: Beanstalkd, keyring: Keyring
) -> None:
    base = "http://t.example"
    pixel = path_of(links.open_url(base, keyring, "same", "r1"))
    click = path_of(links.click_url(base, keyring, "same", "r2", "https://shop.example/a?b=1"))
    elsewhere = path_of(links.click_url(base, keyring, "same", "r3", "https://evil.example/"))
    requests = {
        "pixel": get(pixel, f"User-Agent: {UA}"),
        "pixel, HTTP/1.0": get(pixel, version="HTTP/1.0"),
        "pixel, HTTP/1.0 keep-alive": get(pixel, "Connection: keep-alive", version="HTTP/1.0"),
        "pixel, Connection: close": get(pixel, "Connection: close"),
        "pixel, forwarded (not trusted)": get(pixel, "X-Forwarded-For: 198.51.100.7"),
        "pixel, HEAD": get(pixel, method="HEAD"),
        "pixel, forged": get("/o/k1.Zm9yZ2Vk.AAAAAAAAAAAAAAAAAAAAAA.gif"),
        "pixel, not even a token": get("/o/nothing"),
        "pixel, dot segment": get("/o/../c/k1.Zm9yZ2Vk.AAAAAAAAAAAAAAAAAAAAAA"),
        "click": get(click, f"User-Agent: {UA}"),
        "click, forged": get("/c/k1.Zm9yZ2Vk.AAAAAAAAAAAAAAAAAAAAAA"),
        "click, host not allowed": get(elsewhere),
        "health": get("/healthz"),
    }
    answers: list[dict[str, tuple[str, dict[str, str], bytes]]] = []
    events = []
    for settings in two_ingests:
        seen = {}
        for name, data in requests.items():
            client = Client(settings.listen)
            client.send(data)
            seen[name] = client.answer(to_head=name.endswith("HEAD")).comparable()
            client.close()
        answers.append(seen)
        events.append(queued(beanstalkd))
    fast, plain = answers
    for name in requests:
        assert fast[name] == plain[name], name
    assert fast["pixel"][0] == "HTTP/1.1 200 OK" and fast["click"][0] == "HTTP/1.1 302 Found"
    assert fast["click"][1]["location"] == "https://shop.example/a?b=1"
    assert fast["click, host not allowed"][0].startswith("HTTP/1.1 404")
    assert fast["pixel, HTTP/1.0"][0] == "HTTP/1.0 200 OK"
    # The same events, user agent and client address included: 5 opens, 1 click.
    assert events[0] == events[1]
    assert [e[0] for e in events[0]].count("open") == 5
    assert ("click", "r2", "https://shop.example/a?b=1", UA, "127.0.0.1") in events[0]


def test_one_connection_moves_to_aiohttp_and_keeps_every_answer_in_order(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings()
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    pixel = [path_of(links.open_url("http://t", keyring, "conn", f"r{i}")) for i in range(6)]
    client = Client(settings.listen)
    try:
        client.send(get(pixel[0]))  # fast
        first = client.answer()
        client.send(get("/healthz"))  # handed to aiohttp mid-connection
        health = client.answer()
        client.send(get(pixel[1]) + get(pixel[2]))  # pipelined
        piped = [client.answer(), client.answer()]
        half = get(pixel[3])
        client.send(half[:20])  # split over two writes
        time.sleep(0.1)
        client.send(half[20:])
        split = client.answer()
        client.send(get(pixel[4], "Connection: close"))
        last = client.answer()
        closed = client.closed_by_server()
    finally:
        client.close()
        assert ingest.terminate() == 0
    assert [a.status for a in (first, health, *piped, split, last)] == ["HTTP/1.1 200 OK"] * 6
    assert health.body == b"ok\n" and first.headers["content-type"] == "image/gif"
    assert closed
    assert sorted(e[1] for e in queued(beanstalkd)) == ["r0", "r1", "r2", "r3", "r4"]


def test_many_requests_on_one_fast_connection_are_each_answered_and_queued(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings()
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    client = Client(settings.listen)
    try:
        for i in range(300):
            client.send(get(path_of(links.open_url("http://t", keyring, "many", f"r{i:03d}"))))
            assert client.answer().status == "HTTP/1.1 200 OK"
    finally:
        client.close()
        assert ingest.terminate() == 0
    assert [e[1] for e in queued(beanstalkd)] == sorted(f"r{i:03d}" for i in range(300))


def test_a_graceful_stop_closes_idle_fast_connections_and_exits_clean(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings(shutdown_timeout=5.0)
    ingest: Process = start_ingest(settings, tmp_path / "ingest.log")
    clients = [Client(settings.listen) for _ in range(5)]
    for i, client in enumerate(clients):
        client.send(get(path_of(links.open_url("http://t", keyring, "stop", f"r{i}"))))
        assert client.answer().status == "HTTP/1.1 200 OK"  # kept alive, now idle
    started = time.monotonic()
    code = ingest.terminate()
    took = time.monotonic() - started
    assert code == 0, ingest.log()
    assert took < 3, f"the stop waited {took:.1f} s for idle connections"
    assert all(client.closed_by_server() for client in clients)
    for client in clients:
        client.close()


def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring
) -> None:  # type: ignore[no-untyped-def]
    """In this process, with a short keepalive_timeout (aiohttp's setting, which the
    fast path follows too): a fast connection left idle is closed, one that keeps
    asking is not, and a connection handed to aiohttp obeys the same timeout."""
    settings: Settings = make_settings()
    pixel = path_of(links.open_url("http://t", keyring, "idle", "r"))

    async def scenario() -> tuple[bytes, bytes]:
        ingest = Ingest(settings)
        await ingest.start()
        server = FastServer(ingest, access_log=None, keepalive_timeout=0.3)
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]

        async def ask(path: str, then_wait: float) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(get(path))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK"), head
            for _ in range(4):  # still open while it keeps asking within the timeout
                await asyncio.sleep(0.15)
                writer.write(get(path))
                await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(then_wait)
            try:
                rest = await asyncio.wait_for(reader.read(), 1.0)  # b"..." up to EOF
            finally:
                writer.close()
            return rest

        try:
            fast = await ask(pixel, then_wait=0.6)
            handed = await ask("/healthz", then_wait=0.6)
            listener.close()
            await server.shutdown(1.0)
        finally:
            await ingest.close()
        return fast, handed

    fast, handed = asyncio.run(scenario())
    # Closed by the server: read() reached EOF (after the last answer's body).
    assert fast.endswith(GIF)
    assert handed.endswith(b"ok\n")


def test_a_client_that_never_reads_its_answers_is_not_answered_into_memory(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring
) -> None:  # type: ignore[no-untyped-def]
    """A client sends request after request, each on its own (so the fast path takes
    them), and reads nothing. As aiohttp does, the fast path stops answering while the
    connection's write buffer is full, and stops reading while it cannot answer: the
    client's sends block, and the server's buffer of answers stays small. The server's
    socket buffers are made small so that this shows within a second or two."""
    settings: Settings = make_settings()
    # A 404 page, answered at once; 4 kB, so that the kernel's buffers cannot hold all
    # the requests a server that keeps reading would take.
    request = get("/c/k1.Zm9yZ2Vk.AAAAAAAAAAAAAAAAAAAAAA", "X-Pad: " + "p" * 4000)
    limit = 8_000  # 32 MB of requests, 3.8 MB of answers

    def flood(port: int, gap: float) -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(("127.0.0.1", port))
        sock.settimeout(0.5)
        sent = 0
        try:
            while sent < limit:
                sock.sendall(request)
                sent += 1
                time.sleep(gap)  # one request per read on the server's side
        except TimeoutError:
            pass  # the server stopped reading: what the test hopes for
        finally:
            sock.close()
        return sent

    async def scenario(gap: float) -> tuple[int, int, int]:
        ingest = Ingest(settings)
        await ingest.start()
        server = FastServer(ingest, access_log=None)
        # Small buffers from the start: an accepted socket inherits them from its
        # listener (Linux). Set only once the connection shows up, the kernel could
        # already have grown the send buffer to hold every answer.
        listening = socket.socket()
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listening.bind(("127.0.0.1", 0))
        listener = await asyncio.get_running_loop().create_server(server, sock=listening)
        largest, handed = 0, 0
        transports: dict[object, asyncio.Transport] = {}
        sending = asyncio.ensure_future(
            asyncio.to_thread(flood, listener.sockets[0].getsockname()[1], gap)
        )
        while not sending.done():
            for conn in list(server.fast):
                transport = conn._transport  # the buffer under test
                if transport is not None and conn not in transports:
                    sock = transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    transports[conn] = transport
            for conn, transport in transports.items():
                if transport.get_protocol() is not conn and not transport.is_closing():
                    handed += 1  # now aiohttp's: not what this test is about
                largest = max(largest, transport.get_write_buffer_size())
            await asyncio.sleep(0.002)
        listener.close()
        await server.shutdown(1.0)
        await ingest.close()
        return sending.result(), largest, handed

    # The gap between requests is what keeps them one per read. On a busy machine the
    # server can fall behind by a whole request, read two at once and hand the
    # connection to aiohttp (as it should): then the run tested aiohttp, not the fast
    # path, so it is tried again with a wider gap.
    for gap in (0.0002, 0.002, 0.01):
        sent, largest, handed = asyncio.run(scenario(gap))
        if not handed:
            break
    assert handed == 0, "the test meant the fast path to answer, but aiohttp did"
    assert sent < limit, "the server read every request, answering into its memory"
    assert largest < 512 * 1024, f"the server buffered {largest} bytes of answers"
