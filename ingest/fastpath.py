"""The pixel and the click redirect without aiohttp's per-request machinery.

Profiled under load, most of a pixel's CPU was aiohttp's, not trackbuf's: a request
object and its header multidict, a response object whose headers are built and
serialized anew for every answer, and the per-connection task that runs each handler.
Yet almost every request ingest gets is the same simple thing: one ``GET /o/<token>``
or ``GET /c/<token>`` whose headers arrive in one read, with no body. Those this module
answers itself, from bytes prepared once; everything else (any other path or method, a
body, a header block split over reads, pipelined requests, anything unusual) goes to
aiohttp, which parses and answers it exactly as before.

How: ``FastServer`` is the aiohttp ``web.Server`` that the listener's runner uses, and
each connection starts as a ``FastConnection``. When a read is not one request the fast
path takes, the connection is handed to aiohttp for good (``ingest.aiohttp_adapter``,
the one module that knows how): a ``RequestHandler`` is made for it, the transport's
protocol is switched to it, and the reads so far are fed to it one by one, as they
came. A client that sends anything aiohttp must judge (a header too long, a malformed
line, a slow trickle) is therefore judged by aiohttp, read by read as it would have.

The fast path is deliberately narrower than HTTP: request line ``GET <path> HTTP/1.x``
with a path of unreserved characters only (no query, no escapes: aiohttp would decode
those), header names that are tokens, values of printable ASCII, no
``Transfer-Encoding``, ``Expect``, ``Upgrade`` or ``Proxy-Connection``,
``Content-Length`` at most 0. What it answers and records is ``ingest.decide``'s, as on
aiohttp's path, with the same durability (the answer is written only once the event is
queued or spooled) and the same counting; only the bytes are its own, prepared once per
kind of answer. Keep-alive follows HTTP/1.1 (``Connection: close`` closes; HTTP/1.0
keeps the connection only when asked), a connection idle for ``KEEPALIVE_S`` is closed,
and the client's end of file closes the connection at once, all as aiohttp does.
tests/integration/test_fastpath_differential.py holds the two paths to the same bytes.
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from typing import Any, cast

from ingest.aiohttp_adapter import KEEPALIVE_S, SERVER, ConnectionServer, hand_over
from ingest.app import Ingest
from ingest.decide import Answer, decide
from ingest.outcomes import Outcome
from trackbuf.links import CLICK_PREFIX, OPEN_PREFIX

__all__ = ["FastServer", "Request", "parse"]

# aiohttp's own limit for a request line or a header line: a request that could need
# more is aiohttp's to judge.
MAX_REQUEST_BYTES = 8190
# More header lines than this go to aiohttp, which refuses more than 128.
MAX_HEADERS = 100
# Bytes a client may send ahead (pipelining) while its request is answered; past it,
# reading pauses until the answer is written.
AHEAD_MAX_BYTES = 64 * 1024

# Checked with bytes.translate(None, allowed): what is left is what is not allowed.
_ALNUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_UNRESERVED = _ALNUM + b"-._~/"
_TOKEN = _ALNUM + b"!#$%&'*+-.^_`|~"
_PRINTABLE_LINES = bytes(range(0x20, 0x7F)) + b"\t\r\n"
# Headers that make a request more than a plain GET (a body, a protocol switch, or the
# old WebSocket handshake aiohttp's parser refuses).
_REFUSED = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"sec-websocket-key1"))
# The starts of the two requests the fast path takes.
_GETS = (b"GET " + OPEN_PREFIX.encode(), b"GET " + CLICK_PREFIX.encode())


class Request:
    """One request the fast path answers."""

    __slots__ = ("forwarded", "http10", "keep_alive", "path", "prefetch", "user_agent")

    def __init__(
        self,
        path: str,
        http10: bool,
        keep_alive: bool,
        user_agent: str | None,
        forwarded: list[str],
        prefetch: bool = False,
    ) -> None:
        self.path = path
        self.http10 = http10
        self.keep_alive = keep_alive
        self.user_agent = user_agent
        self.forwarded = forwarded
        self.prefetch = prefetch


def parse(data: bytes) -> Request | None:
    """The request ``data`` holds if it is exactly one the fast path answers (one
    complete ``GET`` of /o/ or /c/ with no body); None for anything else."""
    end = data.find(b"\r\n\r\n")
    if end != len(data) - 4 or end < 0 or len(data) > MAX_REQUEST_BYTES:
        return None  # partial, pipelined, with a body, or long: aiohttp's
    if not data.startswith(_GETS):
        return None
    block = data[:end]
    if block.translate(None, _PRINTABLE_LINES):
        return None  # a control or non-ASCII byte: aiohttp decodes (or refuses) it
    lines = block.split(b"\r\n")
    if block.count(b"\n") != len(lines) - 1 or block.count(b"\r") != len(lines) - 1:
        return None  # a bare CR or LF
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[1].translate(None, _UNRESERVED) or b"/." in parts[1]:
        return None  # "/." may be a dot segment, which aiohttp's URL parser resolves
    version = parts[2]
    if version == b"HTTP/1.1":
        http10, keep_alive = False, True
    elif version == b"HTTP/1.0":
        http10, keep_alive = True, False
    else:
        return None
    if len(lines) > MAX_HEADERS + 1:
        return None
    user_agent: str | None = None
    forwarded: list[str] = []
    prefetch = False
    seen: set[bytes] = set()
    for line in lines[1:]:
        name, colon, raw = line.partition(b":")
        if not colon or not name or name.translate(None, _TOKEN):
            return None  # a folded or malformed line: aiohttp answers 400
        value = raw.strip(b" \t")
        key = name.lower()
        if key in seen and key != b"x-forwarded-for":
            # aiohttp refuses some repeated headers (Host, User-Agent, Content-Length...)
            # and its releases differ on which: whatever it decides, it decides.
            return None
        seen.add(key)
        if key == b"user-agent":
            user_agent = value.decode()
        elif key == b"x-forwarded-for":
            forwarded.append(value.decode())
        elif key in (b"sec-purpose", b"purpose"):
            prefetch = prefetch or value.lower().startswith(b"prefetch")
        elif key == b"connection":
            options = {o.strip() for o in value.lower().split(b",")}
            if b"upgrade" in options or {b"close", b"keep-alive"} <= options:
                return None  # an upgrade, or a contradiction: aiohttp's rules decide
            if b"close" in options:
                keep_alive = False
            elif b"keep-alive" in options:
                keep_alive = True
        elif key == b"proxy-connection":
            # aiohttp's parser (llhttp) reads it as Connection; so rare that it is
            # simpler to let aiohttp decide than to copy how the two combine.
            return None
        elif key == b"content-length":
            if value != b"0":
                return None
        elif key in _REFUSED:
            return None
    if not http10 and b"host" not in seen:
        return None  # HTTP/1.1 requires Host; newer aiohttp answers 400 without it
    return Request(parts[1].decode(), http10, keep_alive, user_agent, forwarded, prefetch)


class _Date:
    """The Date header's value, formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode()
        return self._value


class FastServer(ConnectionServer):
    """aiohttp's low-level server, whose connections start on the fast path."""

    def __init__(self, ingest: Ingest, **kwargs: Any) -> None:
        super().__init__(ingest.handle, **kwargs)
        self.ingest = ingest
        # aiohttp's own setting, so a connection handed over keeps the same rule.
        self.keepalive_s = float(kwargs.get("keepalive_timeout", KEEPALIVE_S))
        self.date = _Date()
        self.fast: set[FastConnection] = set()
        self.closing = False

    def connection(self) -> FastConnection:
        return FastConnection(self)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Close idle fast connections now; the others close once their answer is
        written (within ``timeout``). Then aiohttp's connections, as aiohttp does."""
        self.closing = True
        for conn in list(self.fast):
            conn.close_if_idle()
        deadline = time.monotonic() + (timeout if timeout is not None else 60.0)
        while self.fast and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.fast):
            conn.abort()
        await super().shutdown(timeout)


class FastConnection(asyncio.Protocol):
    """One client connection, answered on the fast path until handed to aiohttp.

    It parses and writes bytes; what to answer and record is ``ingest.decide``'s, and
    the counting is ``Ingest``'s, as on aiohttp's path. Reads are kept apart as they
    came, never joined: aiohttp judges a read as a whole (a malformed request voids the
    requests before it in the same read), so a connection handed over must give it
    the same reads it would have had from the start.
    """

    __slots__ = (
        "_ahead", "_busy", "_idle", "_paused", "_remote", "_server", "_transport",
        "_write_paused",
    )  # fmt: skip

    def __init__(self, server: FastServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._remote: str | None = None
        self._busy = False  # an answer is being prepared
        self._ahead: list[bytes] = []  # reads that came while it waited for that answer
        self._paused = False  # reading paused by us
        # The transport's buffer is full (a client that does not read its answers):
        # no new answer until it drains, as aiohttp waits for the drain after each one.
        self._write_paused = False
        self._idle: asyncio.TimerHandle | None = None

    # asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else None
        self._server.fast.add(self)
        self._wait_idle()

    def data_received(self, data: bytes) -> None:
        if self._busy or self._write_paused:
            self._ahead.append(data)
            if sum(map(len, self._ahead)) > AHEAD_MAX_BYTES:
                self._pause_reading()
            return
        self._serve(data)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._busy:
            self._next_read()

    def eof_received(self) -> bool | None:
        # As aiohttp: the client's end of file ends the connection (the transport
        # closes). An answer still waiting for its event to be durable is not written;
        # the event is stored all the same, as on aiohttp's path.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.fast.discard(self)
        self._stop_idle()
        self._transport = None

    # The fast path ---------------------------------------------------------------------

    def _serve(self, data: bytes) -> None:
        """Answer the request ``data`` holds, or hand the connection over."""
        request = parse(data)
        if request is None:
            self._hand_over([data, *self._ahead])
            return
        ingest = self._server.ingest
        started = time.perf_counter()
        try:
            decision = decide(ingest.rules, "GET", request.path, request.user_agent,
                              request.forwarded, self._remote, request.prefetch)  # fmt: skip
        except Exception:
            # aiohttp's path decides again and answers whatever it answers (logged).
            self._hand_over([data, *self._ahead])
            return
        answer = decision.answer
        record = decision.record
        if record is None:
            ingest.counted(decision, started)
            self._answer(request, answer)
            return
        self._stop_idle()
        self._busy = True
        try:
            future = ingest.submit(record)
        except Exception:
            ingest.record_failed(record.kind, started)
            self._answer(request, answer)
            return

        def durable(done: asyncio.Future[Outcome]) -> None:
            try:
                outcome = done.result()
            except (Exception, asyncio.CancelledError):
                ingest.record_failed(record.kind, started)
            else:
                ingest.record_outcome(record, outcome, started)
            self._answer(request, answer)

        cast("asyncio.Future[Outcome]", future).add_done_callback(durable)

    def _answer(self, request: Request, answer: Answer) -> None:
        """Write the answer, then go on with what the client sent meanwhile."""
        self._busy = False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        keep_alive = request.keep_alive and not self._server.closing
        # As aiohttp: say so only where the version's default is the other way.
        connection = b""
        if keep_alive and request.http10:
            connection = b"Connection: keep-alive\r\n"
        elif not keep_alive and not request.http10:
            connection = b"Connection: close\r\n"
        version = b"HTTP/1.0" if request.http10 else b"HTTP/1.1"
        date = self._server.date.now()
        transport.write(b"".join((version, answer.wire, b"Date: ", date, b"\r\n", SERVER,
                                  connection, b"\r\n", answer.body)))  # fmt: skip
        if not keep_alive:
            transport.close()
            return
        if not self._write_paused:  # else resume_writing() goes on
            self._next_read()

    def _next_read(self) -> None:
        """Between answers: read again, and take what the client sent meanwhile."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._ahead:
            self._serve(self._ahead.pop(0))
        else:
            self._wait_idle()

    def _pause_reading(self) -> None:
        if not self._paused and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True

    def _hand_over(self, reads: list[bytes]) -> None:
        """From now on aiohttp serves this connection, starting with ``reads``."""
        transport = self._transport
        self._server.fast.discard(self)
        self._ahead = []
        if transport is None or transport.is_closing():
            return
        self._stop_idle()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        self._transport = None
        hand_over(self._server, transport, reads, self._write_paused)

    # Idle connections and shutdown -----------------------------------------------------

    def _wait_idle(self) -> None:
        if self._server.closing:
            self.abort()
            return
        self._stop_idle()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_at(loop.time() + self._server.keepalive_s, self.close_if_idle)

    def _stop_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def close_if_idle(self) -> None:
        if not self._busy and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.close()
