"""Which requests ingest's fast path answers itself, and what it reads from them.

Anything it does not take goes to aiohttp whole, so a request wrongly refused here only
costs CPU; one wrongly taken would be answered by rules aiohttp does not share. The
table leans on the second kind: every way a request can differ from a plain GET.
"""

from __future__ import annotations

import pytest

from ingest.fastpath import MAX_REQUEST_BYTES, parse

TOKEN = "k1.WzEsIm8iLCJjMSIsInIxIl0.3PbxHrOTm99u7Fnj4nKbNg"


def request(line: str = f"GET /o/{TOKEN}.gif HTTP/1.1", *headers: str) -> bytes:
    return ("\r\n".join([line, "Host: t.example", *headers]) + "\r\n\r\n").encode("latin-1")


def test_a_plain_pixel_request_is_taken_with_what_ingest_stores() -> None:
    headers = ("User-Agent: Mozilla/5.0 (X11)", "X-Forwarded-For: 198.51.100.7",
               "x-forwarded-for: 203.0.113.9")  # fmt: skip
    got = parse(request(f"GET /o/{TOKEN}.gif HTTP/1.1", *headers))
    assert got is not None
    assert got.path == f"/o/{TOKEN}.gif"
    assert (got.http10, got.keep_alive) == (False, True)
    assert got.user_agent == "Mozilla/5.0 (X11)"
    assert got.forwarded == ["198.51.100.7", "203.0.113.9"]  # every line, in order


def test_a_click_request_is_taken() -> None:
    got = parse(request(f"GET /c/{TOKEN} HTTP/1.1"))
    assert got is not None and got.path == f"/c/{TOKEN}" and got.user_agent is None


@pytest.mark.parametrize(
    ("headers", "version", "keep_alive"),
    [
        ((), "HTTP/1.1", True),
        (("Connection: close",), "HTTP/1.1", False),
        (("Connection: Close, TE",), "HTTP/1.1", False),
        ((), "HTTP/1.0", False),
        (("Connection: keep-alive",), "HTTP/1.0", True),
    ],
)
def test_keep_alive_follows_the_version_and_the_connection_header(
    headers: tuple[str, ...], version: str, keep_alive: bool
) -> None:
    got = parse(request(f"GET /o/{TOKEN}.gif {version}", *headers))
    assert got is not None and got.keep_alive is keep_alive and got.http10 is (version[-1] == "0")


def test_http_1_0_needs_no_host() -> None:
    got = parse(f"GET /o/{TOKEN}.gif HTTP/1.0\r\nUser-Agent: old\r\n\r\n".encode())
    assert got is not None and got.http10 and got.user_agent == "old"


def test_an_empty_body_is_fine() -> None:
    assert parse(request(f"GET /o/{TOKEN}.gif HTTP/1.1", "Content-Length: 0")) is not None


PLAIN = request()
LEFT_TO_AIOHTTP = {
    "HEAD (answered, never recorded)": request(f"HEAD /o/{TOKEN}.gif HTTP/1.1"),
    "POST": request(f"POST /o/{TOKEN}.gif HTTP/1.1"),
    "lower-case method": request(f"get /o/{TOKEN}.gif HTTP/1.1"),
    "health check": request("GET /healthz HTTP/1.1"),
    "robots.txt": request("GET /robots.txt HTTP/1.1"),
    "another path": request("GET /ox/abc HTTP/1.1"),
    "query string": request(f"GET /o/{TOKEN}.gif?utm=1 HTTP/1.1"),
    "percent escape": request("GET /o/k1%2Eabc.gif HTTP/1.1"),
    "dot segment (aiohttp resolves it)": request("GET /o/../c/abc HTTP/1.1"),
    "absolute form": request(f"GET http://t.example/o/{TOKEN}.gif HTTP/1.1"),
    "HTTP/2.0 line": request(f"GET /o/{TOKEN}.gif HTTP/2.0"),
    "HTTP/0.9 style": f"GET /o/{TOKEN}.gif\r\n\r\n".encode(),
    "two spaces": request(f"GET  /o/{TOKEN}.gif HTTP/1.1"),
    "headers not finished": PLAIN[:-2],
    "only the request line so far": f"GET /o/{TOKEN}.gif HTTP/1.1\r\n".encode(),
    "two requests at once (pipelined)": PLAIN + PLAIN,
    "a body": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "Content-Length: 5") + b"hello",
    "a body announced": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "Content-Length: 5"),
    "chunked": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "Transfer-Encoding: chunked"),
    "expect": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "Expect: 100-continue"),
    "upgrade": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "Connection: Upgrade", "Upgrade: h2c"),
    "folded header": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "User-Agent: a", " folded"),
    "space before colon": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "User-Agent : a"),
    "no colon": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "Nonsense"),
    "empty name": request(f"GET /o/{TOKEN}.gif HTTP/1.1", ": a"),
    "non-ASCII value": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "User-Agent: Müller"),
    "NUL in a value": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "User-Agent: a\x00b"),
    "bare LF inside": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "User-Agent: a\nX: b"),
    "bare CR inside": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "User-Agent: a\rb"),
    "LF-only line ends": f"GET /o/{TOKEN}.gif HTTP/1.1\nHost: t\n\n".encode(),
    # aiohttp refuses repeated singleton headers (which ones depends on its release),
    # HTTP/1.1 without Host, over 128 headers, and the old WebSocket handshake.
    "User-Agent twice": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "User-Agent: a", "User-Agent: b"),
    "Host twice": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "Host: other"),
    "Content-Length: 0 twice": request(
        f"GET /o/{TOKEN}.gif HTTP/1.1", "Content-Length: 0", "Content-Length: 0"
    ),
    "HTTP/1.1 without Host": f"GET /o/{TOKEN}.gif HTTP/1.1\r\nUser-Agent: a\r\n\r\n".encode(),
    "Sec-WebSocket-Key1": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "Sec-WebSocket-Key1: 1"),
    "too many headers": request(f"GET /o/{TOKEN}.gif HTTP/1.1", *(f"X-{i}: v" for i in range(130))),
    # aiohttp's parser (llhttp) reads Proxy-Connection as Connection, either way.
    "Proxy-Connection: close": request(f"GET /o/{TOKEN}.gif HTTP/1.1", "Proxy-Connection: close"),
    "HTTP/1.0, Proxy-Connection: keep-alive": request(
        f"GET /o/{TOKEN}.gif HTTP/1.0", "Proxy-Connection: keep-alive"
    ),
    # Contradictory Connection tokens: aiohttp's rules decide.
    "close and keep-alive": request(
        f"GET /o/{TOKEN}.gif HTTP/1.0", "Connection: keep-alive, close"
    ),
    "Connection twice": request(
        f"GET /o/{TOKEN}.gif HTTP/1.1", "Connection: close", "Connection: keep-alive"
    ),
    "longer than aiohttp's line limit": request(
        f"GET /o/{TOKEN}.gif HTTP/1.1", "User-Agent: " + "a" * MAX_REQUEST_BYTES
    ),
}


@pytest.mark.parametrize("data", LEFT_TO_AIOHTTP.values(), ids=LEFT_TO_AIOHTTP.keys())
def test_anything_else_is_left_to_aiohttp(data: bytes) -> None:
    assert parse(data) is None


def test_the_table_holds_no_request_the_fast_path_would_take_anyway() -> None:
    # A guard on the table above: the plain request it varies is taken.
    assert parse(PLAIN) is not None


@pytest.mark.parametrize(
    ("header", "prefetch"),
    [
        ("Sec-Purpose: prefetch", True),
        ("sec-purpose: prefetch;anonymous-client-ip", True),
        ("Purpose: prefetch", True),
        ("Sec-Purpose: prerender", False),
        ("X-Other: prefetch", False),
    ],
)
def test_a_prefetch_request_says_so(header: str, prefetch: bool) -> None:
    got = parse(request(f"GET /o/{TOKEN}.gif HTTP/1.1", "User-Agent: Mozilla/5.0", header))
    assert got is not None and got.prefetch is prefetch
