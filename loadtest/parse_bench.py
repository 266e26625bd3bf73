"""``python -m loadtest.parse_bench``: the fast path's hand parser against llhttp.

ingest's fast path parses a request by hand (``ingest.fastpath.parse``). httptools wraps
llhttp, the parser aiohttp's own C extension is built on; ``parse_llhttp`` is the same
function done by it, with the same narrowing checks around the parser. This times both
on the requests ingest sees most (a pixel from an image proxy, a click from a browser,
wrk's bare request). docs/ARCHITECTURE.md ("The fast path") has the figures. httptools
is not a dependency of trackbuf: ``pip install httptools`` to run this.

``--only hand`` or ``--only llhttp`` parses the three requests 100,000 times each with
one of them and prints nothing, for timing whole processes against each other.
"""

from __future__ import annotations

import importlib
import sys
import timeit
from functools import partial
from typing import Any

from ingest.fastpath import (
    _GETS,
    _PRINTABLE_LINES,
    _REFUSED,
    _UNRESERVED,
    MAX_HEADERS,
    MAX_REQUEST_BYTES,
    Request,
    parse,
)

try:  # not a dependency of trackbuf: install it to run this
    httptools: Any = importlib.import_module("httptools")
except ImportError:
    httptools = None

TOKEN = "k1.WzEsIm8iLCJjMSIsInIxIl0.3PbxHrOTm99u7Fnj4nKbNg"
REQUESTS = {
    "pixel, image proxy": (
        f"GET /o/{TOKEN}.gif HTTP/1.1\r\nHost: t.example.com\r\n"
        "User-Agent: Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
        "(via ggpht.com GoogleImageProxy)\r\nAccept: image/*\r\n"
        "Accept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\n"
        "X-Forwarded-For: 66.249.84.1\r\n\r\n"
    ).encode(),
    "click, browser": (
        f"GET /c/{TOKEN} HTTP/1.1\r\nHost: t.example.com\r\n"
        "User-Agent: Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.0 Safari/605.1.15\r\n"
        "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
        "Accept-Language: en-GB,en;q=0.9\r\nAccept-Encoding: gzip, deflate, br\r\n"
        "Sec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Site: none\r\n"
        "Upgrade-Insecure-Requests: 1\r\nConnection: keep-alive\r\n\r\n"
    ).encode(),
    "pixel, wrk": f"GET /o/{TOKEN}.gif HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n".encode(),
}


class _Fields:
    """What the fast path reads from a request, as llhttp reports it (httptools'
    callbacks), and whether a header makes it aiohttp's."""

    __slots__ = ("complete", "forwarded", "keep_alive", "parser", "refused", "seen", "url",
                 "user_agent")  # fmt: skip

    def __init__(self) -> None:
        # The parser and its callbacks hold each other: parse() breaks the cycle, so
        # each request's pair is freed at once, not by the garbage collector.
        self.parser: Any = httptools.HttpRequestParser(self)
        self.keep_alive = False
        self.url = b""
        self.user_agent: str | None = None
        self.forwarded: list[str] = []
        self.refused = False
        self.seen: set[bytes] = set()
        self.complete = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        seen = self.seen
        if key in seen and key != b"x-forwarded-for":
            # aiohttp refuses some repeated headers (Host, User-Agent, Content-Length...)
            # and its releases differ on which: whatever it decides, it decides.
            self.refused = True
        seen.add(key)
        if key == b"user-agent":
            self.user_agent = value.decode()
        elif key == b"x-forwarded-for":
            self.forwarded.append(value.decode())
        elif key == b"connection":
            options = {o.strip() for o in value.lower().split(b",")}
            if b"upgrade" in options or {b"close", b"keep-alive"} <= options:
                self.refused = True  # an upgrade, or a contradiction: aiohttp's rules decide
        elif key == b"content-length":
            if value != b"0":
                self.refused = True
        elif key in _REFUSED:
            self.refused = True

    def on_headers_complete(self) -> None:
        # Asked now: once the message is complete, llhttp forgets it for the next one.
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.complete += 1


def parse_llhttp(data: bytes) -> Request | None:
    """``ingest.fastpath.parse`` done by llhttp (httptools): the same answer for every
    request in tests/unit/test_fastpath_parse.py's table (checked with httptools
    0.9.0). The checks around the parser keep it as narrow as the hand parser."""
    end = data.find(b"\r\n\r\n")
    if end != len(data) - 4 or end < 0 or len(data) > MAX_REQUEST_BYTES:
        return None  # partial, pipelined, with a body, or long: aiohttp's
    if not data.startswith(_GETS):
        return None
    if data.translate(None, _PRINTABLE_LINES):
        return None  # a control or non-ASCII byte: aiohttp decodes (or refuses) it
    lines = data.count(b"\r\n")
    if data.count(b"\n") != lines or data.count(b"\r") != lines:
        return None  # a bare CR or LF
    if lines > MAX_HEADERS + 2 or b"\r\n " in data or b"\r\n\t" in data:
        return None  # many headers, or a folded line
    fields = _Fields()
    parser = fields.parser
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    finally:
        fields.parser = None
    if fields.complete != 1 or fields.refused:
        return None
    url = fields.url
    if url.translate(None, _UNRESERVED) or b"/." in url:
        return None  # "/." may be a dot segment, which aiohttp's URL parser resolves
    if not data.startswith(b"GET " + url + b" HTTP/1."):
        return None  # not one space each side of the path
    version = parser.get_http_version()
    if version == "1.1":
        if b"host" not in fields.seen:
            return None  # HTTP/1.1 requires Host; newer aiohttp answers 400 without it
        http10 = False
    elif version == "1.0":
        http10 = True
    else:
        return None
    return Request(url.decode(), http10, fields.keep_alive, fields.user_agent, fields.forwarded)


def main() -> int:
    if httptools is None:
        print("python -m loadtest.parse_bench needs httptools: pip install httptools")
        return 2
    rounds = 100_000
    if sys.argv[1:2] == ["--only"]:
        chosen = parse if sys.argv[2] == "hand" else parse_llhttp
        for data in REQUESTS.values():
            for _ in range(rounds):
                chosen(data)
        return 0
    print(f"µs per request, best of 7 x {rounds:,} (lower is better)")
    print(f"{'request':20} {'by hand':>8} {'llhttp':>8} {'llhttp/hand':>12}")
    for name, data in REQUESTS.items():
        hand, ours = parse(data), parse_llhttp(data)
        assert hand is not None and ours is not None, name
        assert (hand.path, hand.http10, hand.keep_alive, hand.user_agent, hand.forwarded) == (
            ours.path, ours.http10, ours.keep_alive, ours.user_agent, ours.forwarded
        ), name  # fmt: skip
        by_hand = min(timeit.repeat(partial(parse, data), number=rounds, repeat=7))
        llhttp = min(timeit.repeat(partial(parse_llhttp, data), number=rounds, repeat=7))
        print(f"{name:20} {by_hand / rounds * 1e6:8.2f} {llhttp / rounds * 1e6:8.2f} "
              f"{llhttp / by_hand:12.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
