"""The fast path against aiohttp, byte sequence by byte sequence.

Two real ingest processes share one beanstalkd, each with a tube of its own: one with
the fast path on, one with ``TRACKBUF_FAST_PATH=0`` (aiohttp answers everything). A
seeded generator writes raw request sequences (valid opens and clicks signed with the
test keyring, forged tokens, other paths and methods, HEAD, pipelined requests,
requests split over several writes, keep-alive and close in every spelling including
``Proxy-Connection``, half-closed connections, malformed requests after valid ones,
oversized headers, bodies), and each sequence is sent to both. Per sequence they must
agree on every answer byte but the Date header's value, on whether and when the
connection was closed, and on the events queued (compared without their id and time).

Seeded: a failure names its sequence, and the same seed sends the same bytes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import greenstalk
import pytest

from tests.procs import Process, start_ingest
from tests.servers import Beanstalkd, free_port, taken_jobs
from trackbuf import links
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("TRACKBUF_DIFFERENTIAL_SEED", "1919"))
SEQUENCES = 2500
REPLAYS_MAX = 200  # differences replayed, a few at a time, at most
# To replay some of them: TRACKBUF_DIFFERENTIAL_ONLY=152,726
ONLY = [int(n) for n in os.environ.get("TRACKBUF_DIFFERENTIAL_ONLY", "").split(",") if n]
PARALLEL = 24  # sequences in flight at once, per ingest
QUIET_S = 0.05  # after a write: no more answer bytes for this long, then the next write
# Each job's first event waits this long for others: an answer takes at least this, so
# a write GAP_S after the one before is read on its own while the server is still busy.
LINGER_MS = 20
GAP_S = 0.005
END_S = 3.0  # after the last write: the server must have closed within this
CAMPAIGN = "diff"
SENTINEL = b"GET /healthz HTTP/1.1\r\nHost: t.example\r\nConnection: close\r\n\r\n"
UAS = ["Mozilla/5.0 (Windows NT 10.0; Win64; x64) Outlook/16.0", "GoogleImageProxy",
       "curl/8.5.0", ""]  # fmt: skip
CONNECTION = [
    [], [], [], ["Connection: close"], ["Connection: keep-alive"], ["Connection: Keep-Alive"],
    ["Connection: close, TE"], ["Proxy-Connection: close"], ["Proxy-Connection: keep-alive"],
    ["Connection: keep-alive", "Proxy-Connection: close"], ["Connection: upgrade"],
]  # fmt: skip
MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET /o/x.gif HTTP/1.1\r\nHost: t\r\nNo colon here\r\n\r\n",
    b"GET /c/x HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
    b"GET /o/x.gif HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",
    b"GET /o/x.gif HTTP/9.9\r\nHost: t\r\n\r\n",
    b"GET /o/x.gif HTTP/1.1\r\nHost: t\r\n folded: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
]


@dataclass
class Sequence:
    number: int
    attempt: int  # a replay: the same bytes but for the recipients, which name it
    writes: list[tuple[bytes, bool]]  # each written on its own; True: after the answers
    # to the one before, False: a moment later, while the server may still be busy
    end: str  # "sentinel": a last request that closes; "half-close": shutdown(SHUT_WR)
    described: list[str]


class Maker:
    """The requests of one sequence, from a generator seeded for that sequence."""

    def __init__(self, number: int, attempt: int, keyring: Keyring) -> None:
        self.rng = random.Random(SEED * 1_000_003 + number)
        self.keyring = keyring
        self.name = f"s{number}.{attempt}"
        self.count = 0

    def recipient(self) -> str:
        self.count += 1
        return f"{self.name}-{self.count}"

    def headers(self, version: str) -> list[str]:
        rng = self.rng
        lines = []
        if version == "HTTP/1.1" or rng.random() < 0.5:
            lines.append("Host: t.example")
        if rng.random() < 0.7:
            lines.append("User-Agent: " + rng.choice(UAS))
        if rng.random() < 0.3:
            lines.append("X-Forwarded-For: 10.0.0.1, 198.51.100." + str(rng.randrange(256)))
        lines += rng.choice(CONNECTION)
        rng.shuffle(lines)
        return lines

    def request(self) -> tuple[str, bytes]:
        rng = self.rng
        version = "HTTP/1.0" if rng.random() < 0.25 else "HTTP/1.1"
        method = "HEAD" if rng.random() < 0.1 else "GET"
        body = b""
        extra: list[str] = []
        shape = rng.choices(
            ["open", "click", "forged-open", "forged-click", "other", "post", "body",
             "malformed", "oversized"],
            [30, 25, 8, 8, 8, 4, 4, 7, 3],
        )[0]  # fmt: skip
        if shape == "open":
            path = (
                "/"
                + links.open_url("http://t", self.keyring, CAMPAIGN, self.recipient()).split(
                    "/", 3
                )[3]
            )
        elif shape == "click":
            target = f"https://shop.example/p/{rng.randrange(1000)}?a=1"
            url = links.click_url("http://t", self.keyring, CAMPAIGN, self.recipient(), target)
            path = "/" + url.split("/", 3)[3]
        elif shape == "forged-open":
            path = "/o/k1.Zm9yZ2Vk.AAAAAAAAAAAAAAAAAAAAAA.gif"
        elif shape == "forged-click":
            path = rng.choice(["/c/k1.Zm9yZ2Vk.AAAAAAAAAAAAAAAAAAAAAA", "/c/nothing"])
        elif shape == "other":
            path = rng.choice(["/healthz", "/robots.txt", "/nope", "/", "/o", "/readyz"])
        elif shape == "post":
            method, path, body = "POST", "/o/x.gif", b"x=1"
            extra.append("Content-Length: 3")
        elif shape == "body":
            token = links.open_url("http://t", self.keyring, CAMPAIGN, self.recipient())
            path, body = "/" + token.split("/", 3)[3], b"hello"
            extra.append("Content-Length: 5")
        elif shape == "malformed":
            return shape, rng.choice(MALFORMED)
        else:
            path = "/o/x.gif"
            extra.append("User-Agent: " + "U" * rng.choice([8100, 8200, 9000, 20000]))
        lines = [f"{method} {path} {version}", *self.headers(version), *extra]
        return f"{shape} {method} {version}", ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def make_sequence(number: int, keyring: Keyring, attempt: int = 0) -> Sequence:
    maker = Maker(number, attempt, keyring)
    rng = maker.rng
    described, raws = [], []
    for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
        what, raw = maker.request()
        described.append(what)
        raws.append(raw)
    writes: list[tuple[bytes, bool]] = []
    pending = b""
    for raw in raws:
        pending += raw
        how = rng.random()
        if how < 0.2:
            continue  # pipelined: written with the next one
        wait = rng.random() < 0.7
        if how < 0.4 and len(pending) > 2:
            cut = rng.randrange(1, len(pending))
            writes += [(pending[:cut], wait), (pending[cut:], wait)]  # split over two writes
        else:
            writes.append((pending, wait))
        pending = b""
    if pending:
        writes.append((pending, True))
    # The last request's answers come before the end: a sentinel or an end of file
    # written while the server is busy could share its read, or not, on a busy machine.
    writes[-1] = (writes[-1][0], True)
    end = "half-close" if rng.random() < 0.25 else "sentinel"
    if end == "half-close":
        # One valid open or click and at once the end of file: deterministic, since its
        # answer waits for beanstalkd. Otherwise whether an answer beats the end of
        # file is a race (on aiohttp's path too): those wait for their answers first.
        last, _ = writes[-1]
        durable = described[0].startswith(("open GET", "click GET"))
        writes[-1] = (last, not (durable and len(raws) == 1 and len(writes) == 1))
    return Sequence(number, attempt, writes, end, described)


@dataclass
class Seen:
    stream: bytes  # every answer byte, the Date header's value blanked; which requests
    # were answered says when the connection was closed
    ended: str  # "closed" by the server, or still "open" long after the last write


Difference = tuple[Sequence, Seen, Seen, tuple[Counter[tuple[object, ...]], ...]]
DATE = re.compile(rb"\r\nDate: [^\r]*")
# aiohttp before 3.10.6 labels an empty body (the redirect's) application/octet-stream,
# a label that describes nothing and that later releases dropped; the fast path never
# wrote it. Only on those releases (the floor suite's) is it left out of the comparison.
OLD_EMPTY_LABEL = tuple(map(int, re.findall(r"\d+", aiohttp.__version__)[:3])) < (3, 10, 6)
EMPTY_LABEL = b"\r\nContent-Type: application/octet-stream"
ANSWER_START = re.compile(rb"(?=HTTP/1\.[01] [0-9]{3} )")


def how_they_differ(
    fast: Seen, plain: Seen, events: tuple[Counter[tuple[object, ...]], ...]
) -> str:
    """A name for the kind of difference, so a failure groups them (answers are split
    where a status line starts: close enough for a name)."""
    if events[0] != events[1]:
        return "events"
    if fast.ended != plain.ended:
        return "connection left open"
    answers = [ANSWER_START.split(s.stream)[1:] for s in (fast, plain)]
    if len(answers[0]) != len(answers[1]):
        return "number of answers"
    for a, b in zip(*answers, strict=True):
        (top_a, _, body_a), (top_b, _, body_b) = a.partition(b"\r\n\r\n"), b.partition(b"\r\n\r\n")
        lines_a, lines_b = top_a.split(b"\r\n"), top_b.split(b"\r\n")
        if lines_a[0] != lines_b[0]:
            return "status line"
        if sorted(lines_a) != sorted(lines_b):
            names = {line.split(b":")[0] for line in set(lines_a) ^ set(lines_b)}
            return "headers " + b",".join(sorted(names)).decode()
        if lines_a != lines_b:
            return "header order"
        if body_a != body_b:
            return "body"
    return "other"


async def play(port: int, seq: Sequence) -> Seen:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    closed = asyncio.Event()
    ended = "closed"  # an end of file, or a reset for a write after the server closed

    async def read() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.extend(chunk)
        closed.set()

    async def quiet() -> None:
        while not closed.is_set():
            size = len(received)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed.wait(), QUIET_S)
            if len(received) == size:
                return

    reading = asyncio.create_task(read())
    try:
        writes = [*seq.writes, (SENTINEL, True)] if seq.end == "sentinel" else seq.writes
        for i, (data, wait) in enumerate(writes):
            if closed.is_set():
                break
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            if wait:
                await quiet()
            elif i < len(writes) - 1:
                await asyncio.sleep(GAP_S)  # a read of its own, the answer still pending
        if seq.end == "half-close" and not closed.is_set():
            with contextlib.suppress(OSError):
                writer.transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
        try:
            await asyncio.wait_for(closed.wait(), END_S)
        except TimeoutError:
            ended = "open"
    finally:
        reading.cancel()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    stream = DATE.sub(b"\r\nDate: -", bytes(received))
    if OLD_EMPTY_LABEL:
        stream = stream.replace(EMPTY_LABEL, b"")
    return Seen(stream, ended)


Events = dict[str, Counter[tuple[object, ...]]]


def events_by_sequence(server: Beanstalkd, tube: str) -> Events:
    """Every queued event, per sequence and attempt, read with greenstalk (not
    trackbuf's own client)."""
    found: Events = {}
    for job in taken_jobs(server, tube):
        for e in job:
            name = e.recipient.split("-")[0]
            key = (e.kind, e.campaign, e.recipient, e.url, e.user_agent, e.ip)
            found.setdefault(name, Counter())[key] += 1
    return found


def settle(server: Beanstalkd, tubes: list[str]) -> None:
    """Until the queued counts stop moving: a half-closed connection's event is handed
    over without an answer to wait for."""
    last = None
    deadline = time.monotonic() + 10
    with greenstalk.Client(("127.0.0.1", server.port)) as client:
        while time.monotonic() < deadline:
            now = [client.stats_tube(t)["current-jobs-ready"] for t in tubes]
            if now == last:
                return
            last = now
            time.sleep(0.5)


@pytest.fixture
def both(make_settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[Process] = []
    made: list[Settings] = []
    try:
        for fast in (True, False):
            name = "fast" if fast else "aiohttp"
            settings: Settings = make_settings(
                fast_path=fast, listen=f"127.0.0.1:{free_port()}",
                admin_listen=f"127.0.0.1:{free_port()}", spool_dir=str(tmp_path / name),
                redirect_hosts="shop.example", tube=f"diff-{name}", trust_forwarded=True,
                ip_mode="full", user_agent_mode="full", job_linger_ms=LINGER_MS,
            )  # fmt: skip
            started.append(start_ingest(settings, tmp_path / f"{name}.log"))
            made.append(settings)
        yield made
    finally:
        for proc in started:
            assert proc.terminate() == 0, proc.log()


def test_the_fast_path_and_aiohttp_agree_on_every_byte_sequence(
    both: list[Settings], beanstalkd: Beanstalkd, keyring: Keyring
) -> None:
    """A difference must show again in two replays of its sequence, four at a time
    rather than 24: a write meant as a read of its own can share a read with the next
    one on a busy machine, and then the two servers were not sent the same reads."""
    ports = [int(s.listen.rsplit(":", 1)[1]) for s in both]
    tubes = [s.tube for s in both]

    async def run(sequences: list[Sequence], parallel: int) -> list[tuple[Seen, Seen]]:
        gate = asyncio.Semaphore(parallel)

        async def one(seq: Sequence) -> tuple[Seen, Seen]:
            async with gate:
                fast, plain = await asyncio.gather(play(ports[0], seq), play(ports[1], seq))
                return fast, plain

        return await asyncio.gather(*(one(s) for s in sequences))

    def differing(sequences: list[Sequence], parallel: int) -> list[Difference]:
        seen = asyncio.run(run(sequences, parallel))
        settle(beanstalkd, tubes)
        fast_events, plain_events = (events_by_sequence(beanstalkd, t) for t in tubes)
        found = []
        for seq, (fast, plain) in zip(sequences, seen, strict=True):
            name = f"s{seq.number}.{seq.attempt}"
            events = (fast_events.get(name, Counter()), plain_events.get(name, Counter()))
            if fast != plain or events[0] != events[1]:
                found.append((seq, fast, plain, events))
        counted.append(sum(len(c) for c in fast_events.values()))
        return found

    counted: list[int] = []
    numbers = ONLY or range(SEQUENCES)
    differ = differing([make_sequence(n, keyring) for n in numbers], PARALLEL)
    for attempt in (1, 2):
        if not differ or len(differ) > REPLAYS_MAX:
            break  # none to replay, or so many that they are no accident of timing
        again = [make_sequence(d[0].number, keyring, attempt) for d in differ]
        differ = differing(again, 4)
    kinds: dict[str, int] = Counter()
    report = []
    for seq, fast, plain, events in differ:
        kind = how_they_differ(fast, plain, events)
        kinds[kind] += 1
        if kinds[kind] > 2:
            continue
        report.append(
            f"{kind}: sequence {seq.number} (seed {SEED}): {seq.described}, end {seq.end}\n"
            f"  writes {seq.writes!r}\n  fast    {fast}\n  aiohttp {plain}\n"
            f"  events fast {sorted(events[0])}\n  events aiohttp {sorted(events[1])}"
        )
    assert not differ, (
        f"{len(differ)} of {SEQUENCES} sequences differ: {dict(kinds)}\n" + "\n".join(report)
    )
    # A guard on the generator: the sequences did reach the fast path's own answers.
    assert counted[0] >= len(numbers) // 3


def test_the_disagreements_once_found_are_gone(
    both: list[Settings], beanstalkd: Beanstalkd, keyring: Keyring
) -> None:
    """The cases the differential fuzz first found, by name: each sent to both ingests,
    which must agree, and answer as aiohttp does."""
    base = "http://t.example"

    def path(url: str) -> str:
        return "/" + url.split("/", 3)[3]

    def get(target: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
        return ("\r\n".join([f"GET {target} {version}", *headers, "", ""])).encode()

    def pixel(n: int) -> str:
        return path(links.open_url(base, keyring, CAMPAIGN, f"k{n}-1"))

    click = path(links.click_url(base, keyring, CAMPAIGN, "k3-1", "https://shop.example/x"))
    host = "Host: t.example"
    cases = {
        "Proxy-Connection: close on HTTP/1.1 closes": Sequence(
            1, 0, [(get(pixel(1), host, "Proxy-Connection: close"), True)], "sentinel", []
        ),
        "HTTP/1.0 with Proxy-Connection: keep-alive stays open": Sequence(
            2, 0, [(get(pixel(2), "Proxy-Connection: keep-alive", version="HTTP/1.0"), True)],
            "sentinel", [],
        ),
        "a malformed request read while a pipelined click waits": Sequence(
            3, 0, [(get(click, host), False), (MALFORMED[1], True)], "sentinel", []
        ),
        "half-closed at once after an open": Sequence(
            4, 0, [(get(pixel(4), host), False)], "half-close", []
        ),
        "the invalid link page": Sequence(
            5, 0, [(get("/c/k1.Zm9yZ2Vk.AAAAAAAAAAAAAAAAAAAAAA", host), True)], "sentinel", []
        ),
    }  # fmt: skip
    ports = [int(s.listen.rsplit(":", 1)[1]) for s in both]

    async def run() -> list[list[Seen]]:
        return [
            list(await asyncio.gather(*(play(port, seq) for port in ports)))
            for seq in cases.values()
        ]

    seen = dict(zip(cases, asyncio.run(run()), strict=True))
    settle(beanstalkd, [s.tube for s in both])
    events = [events_by_sequence(beanstalkd, s.tube) for s in both]
    for name, (fast, plain) in seen.items():
        assert fast == plain, name
    assert events[0] == events[1]
    closing = seen["Proxy-Connection: close on HTTP/1.1 closes"][0].stream
    assert closing.count(b"HTTP/1.1 ") == 1 and b"Connection: close\r\n" in closing
    open10 = seen["HTTP/1.0 with Proxy-Connection: keep-alive stays open"][0].stream
    assert open10.startswith(b"HTTP/1.0 200 OK") and b"ok\n" in open10  # the sentinel too
    piled = seen["a malformed request read while a pipelined click waits"][0].stream
    assert piled.startswith(b"HTTP/1.1 302 Found") and b" 400 Bad Request" in piled
    assert sorted(events[0]) == ["k1", "k2", "k3", "k4"]  # half-closed: stored too
    assert seen["half-closed at once after an open"][0].stream == b""  # as aiohttp: no answer
