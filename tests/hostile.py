"""Hostile raw HTTP requests, generated from a seed, and a raw-socket client for them.

Everything here is bytes on a socket: no HTTP client library sits in between to fix a
method's case, encode a path, drop a header it dislikes or refuse a CR in a value. Each
:class:`Probe` says what it is and, for the few valid requests mixed in as controls,
which event it must produce, so a test can count the events in beanstalkd exactly.

Only valid control requests carry a token that verifies; every hostile request carries
a forged, mangled, wrong-kind or unsafe one (or none). Percent-encoding a valid token's
characters does not make it hostile (the server decodes the path first), so those are
controls too, and must be recorded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from trackbuf import links
from trackbuf.tokens import Keyring

CAMPAIGN = "hostile"
READ_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Probe:
    kind: str  # the generator that made it, for failure messages
    raw: bytes
    answers: int = 1  # responses to read (pipelined requests)
    head: bool = False  # HEAD answers carry no body whatever Content-Length says
    records: str | None = None  # recipient of the event a valid control must produce
    location: str | None = None  # the target a valid click must redirect to


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


@dataclass
class ProbeResult:
    """What one probe got back: its answers, or how the server ended the exchange."""

    probe: Probe
    answers: list[Answer] = field(default_factory=list)
    error: str | None = None  # the server closed or stayed silent (a fine answer to junk)


def request(method: str | bytes, target: str | bytes, headers: list[bytes] | None = None,
            version: bytes = b"HTTP/1.1", body: bytes = b"") -> bytes:  # fmt: skip
    """One request exactly as given; ``Connection: close`` keeps reading simple."""
    m = method.encode() if isinstance(method, str) else method
    t = target.encode() if isinstance(target, str) else target
    lines = [m + b" " + t + b" " + version, b"Host: t.example", *(headers or [])]
    if not any(h.lower().startswith(b"connection:") for h in headers or []):
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def sign_anything(secret: bytes, kid: str, fields: object) -> str:
    """A token over any payload, signed with a real key: the spec (HMAC-SHA256 over
    ``kid.payload``, 16 bytes, base64url unpadded) written out independently of
    trackbuf.tokens, so payloads trackbuf itself refuses to sign can be tried."""
    body = base64.urlsafe_b64encode(orjson.dumps(fields)).rstrip(b"=").decode()
    signed = f"{kid}.{body}"
    tag = hmac.new(secret, signed.encode(), hashlib.sha256).digest()[:16]
    return f"{signed}.{base64.urlsafe_b64encode(tag).rstrip(b'=').decode()}"


EVIL = "https://evil.example/phish"
UNSAFE_TARGETS = [
    "javascript:alert(1)", "data:text/html,<script>alert(1)</script>", "//evil.example/",
    "http://", "https://evil.example/\r\nSet-Cookie: a=b", "https://evil.example/ x",
    "ftp://evil.example/", "https:evil.example", "/relative", "http://\x7f/", "",
    "https://evil.example/" + "a" * 3000,
]  # fmt: skip
METHODS = [
    "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "MKCOL",
    "LOCK", "get", "Get", "head", "BREW", "M-SEARCH", "PRI", "X" * 300, "GE T", "G\x00ET",
    "\xff\xfe", "GET\t", "", "123", "GET/1.1",
]  # fmt: skip


class Generator:
    """Seeded: the same seed gives the same requests, so a failure can be replayed."""

    def __init__(self, seed: int, keyring: Keyring, secrets: dict[str, bytes],
                 prefix: str) -> None:  # fmt: skip
        self.rng = random.Random(seed)
        self.keyring = keyring
        self.secrets = secrets  # kid -> secret, to sign payloads trackbuf would refuse
        self.prefix = prefix
        self.targets: set[str] = set()  # every target a test-signed link carried
        self.valid: list[str] = []  # recipients of the valid controls, in order
        self._n = 0
        self._pool = [self._signed_pair() for _ in range(8)]  # tokens to mangle

    # Valid tokens ------------------------------------------------------------------

    def _recipient(self) -> str:
        self._n += 1
        return f"{self.prefix}-{self._n}"

    def _target(self) -> str:
        target = f"https://shop.example/p/{self.rng.randrange(10**6)}?utm=x&a=%20b"
        self.targets.add(target)
        return target

    def _open_token(self, recipient: str) -> str:
        url = links.open_url("http://t", self.keyring, CAMPAIGN, recipient)
        return url.rsplit("/", 1)[1].removesuffix(".gif")

    def _click_token(self, recipient: str, target: str) -> str:
        return links.click_url("http://t", self.keyring, CAMPAIGN, recipient, target).rsplit(
            "/", 1
        )[1]

    def _signed_pair(self) -> tuple[str, str]:
        """An open and a click token never sent as they are (only mangled)."""
        recipient = self._recipient()
        return self._open_token(recipient), self._click_token(recipient, self._target())

    def _forged(self) -> str:
        """A token that must not verify, of one of many shapes."""
        rng = self.rng
        open_token, click_token = rng.choice(self._pool)
        token = rng.choice((open_token, click_token))
        kid, body, tag = token.split(".")
        choices: list[Callable[[], str]] = [
            lambda: token[: rng.randrange(1, len(token))],  # truncated
            lambda: token + rng.choice(["=", "==", ".", "A", "%00", ".x"]),
            lambda: _flip(rng, token),
            lambda: f"{kid}.{body}.{tag[:-1]}{_other_b64(rng, tag[-1])}",  # last char respelt
            lambda: f"k9.{body}.{tag}",  # unknown kid
            lambda: f"{'k1' if kid == 'k2' else 'k2'}.{body}.{tag}",  # another key's kid
            lambda: f"{kid}.{self._other_body(body)}.{tag}",  # another token's body
            lambda: f"{kid}.{body}.{tag}".upper(),
            lambda: f"{kid}..{tag}",
            lambda: "....",
            lambda: "",
            lambda: self._forged_with_wrong_key(),
            lambda: self._signed_unsafe(),
            lambda: "".join(rng.choice("ABCxyz019-_.") for _ in range(rng.randrange(1, 300))),
            lambda: base64.urlsafe_b64encode(rng.randbytes(rng.randrange(1, 200))).decode(),
        ]
        return rng.choice(choices)()

    def _other_body(self, body: str) -> str:
        bodies = [t.split(".")[1] for pair in self._pool for t in pair]
        return self.rng.choice([b for b in bodies if b != body])

    def _forged_with_wrong_key(self) -> str:
        forger = Keyring.parse("k2:an-attacker-guessed-this-key-0123")
        return links.click_url("http://t", forger, CAMPAIGN, self._recipient(), EVIL).rsplit(
            "/", 1
        )[1]

    def _signed_unsafe(self) -> str:
        """Signed with a real key over a payload trackbuf must refuse: an unsafe target,
        bad fields, a future format. Verifies as a signature, fails as a payload."""
        rng = self.rng
        kid = rng.choice(sorted(self.secrets))
        recipient = self._recipient()
        payload: object = rng.choice([
            [1, "c", CAMPAIGN, recipient, rng.choice(UNSAFE_TARGETS)],
            [1, "c", CAMPAIGN, recipient],
            [1, "o", CAMPAIGN, recipient, EVIL],
            [1, "c", "", recipient, EVIL],
            [1, "c", CAMPAIGN, "r" * 300, EVIL],
            [1, "c", CAMPAIGN, 42, EVIL],
            [2, "c", CAMPAIGN, recipient, EVIL],
            [1, "x", CAMPAIGN, recipient, EVIL],
            [1, "c", CAMPAIGN, recipient, EVIL, "extra"],
            {"kind": "c", "url": EVIL},
            "not a list",
        ])  # fmt: skip
        return sign_anything(self.secrets[kid], kid, payload)

    # Probes --------------------------------------------------------------------------

    def valid_control(self) -> Probe:
        """A real open or click from a mail client, with headers real clients send and a
        few odd ones ingest must survive (bytes that are not UTF-8, an overlong user
        agent, a forged X-Forwarded-For)."""
        rng = self.rng
        recipient = self._recipient()
        self.valid.append(recipient)
        ua = rng.choice([
            b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) Outlook/16.0",
            b"Mozilla/5.0 \xff\xfe\xc0\xaf not utf-8",
            b"A" * 5000,
            b"GoogleImageProxy",
            b"",
        ])  # fmt: skip
        headers = [b"User-Agent: " + ua, b"Accept: */*"]
        if rng.random() < 0.3:
            headers.append(b"X-Forwarded-For: 10.0.0.1, " + rng.choice([b"::1", b"junk", b"\xff"]))
        if rng.random() < 0.5:
            token = self._open_token(recipient)
            target = f"/o/{_percent_some(rng, token)}.gif"
            return Probe("valid-open", request("GET", target, headers), records=recipient)
        location = self._target()
        token = self._click_token(recipient, location)
        return Probe("valid-click", request("GET", f"/c/{_percent_some(rng, token)}", headers),
                     records=recipient, location=location)  # fmt: skip

    def head_of_valid(self) -> Probe:
        """HEAD on a valid link (a link scanner): answered, never recorded."""
        recipient = self._recipient()
        if self.rng.random() < 0.5:
            target = f"/o/{self._open_token(recipient)}.gif"
            return Probe("head-valid", request("HEAD", target), head=True)
        location = self._target()
        token = self._click_token(recipient, location)
        return Probe("head-valid", request("HEAD", f"/c/{token}"), head=True, location=location)

    def wrong_kind(self) -> Probe:
        open_token, click_token = self._signed_pair()
        if self.rng.random() < 0.5:
            return Probe("wrong-kind", request("GET", f"/c/{open_token}"))
        return Probe("wrong-kind", request("GET", f"/o/{click_token}.gif"))

    def forged(self) -> Probe:
        route = self.rng.choice(["/o/{}.gif", "/o/{}", "/c/{}", "/c/{}/", "/c/{}?url=" + EVIL])
        return Probe("forged-token", request("GET", route.format(self._forged())))

    def odd_method(self) -> Probe:
        rng = self.rng
        method = rng.choice(METHODS).encode("utf-8", "surrogateescape")
        if rng.random() < 0.2:
            method = bytes(rng.randrange(33, 256) for _ in range(rng.randrange(1, 40)))
        target = rng.choice(["/o/x.gif", "/c/" + self._forged(), "*", "/healthz",
                             "http://evil.example/c/x", "evil.example:443", "/"])  # fmt: skip
        body = b"x=1" if rng.random() < 0.5 else b""
        headers = [b"Content-Length: %d" % len(body)] if body else []
        return Probe("odd-method", request(method, target, headers, body=body))

    def huge_headers(self) -> Probe:
        rng = self.rng
        target = rng.choice(["/o/x.gif", "/c/" + self._forged(), "/healthz"])
        shape = rng.randrange(5)
        if shape == 0:  # one enormous value
            headers = [b"X-Big: " + b"a" * rng.randrange(8000, 200_000)]
        elif shape == 1:  # an enormous name
            headers = [b"X" * rng.randrange(8000, 70_000) + b": v"]
        elif shape == 2:  # very many headers
            headers = [b"X-H%d: v" % i for i in range(rng.randrange(100, 3000))]
        elif shape == 3:  # many cookies, each fine, together 100 kB+
            headers = [b"Cookie: c%d=%s" % (i, b"v" * 4000) for i in range(rng.randrange(20, 60))]
        else:  # a user agent just under and over the line limit
            headers = [b"User-Agent: " + b"U" * rng.randrange(8100, 8300)]
        return Probe("huge-headers", request("GET", target, headers))

    def invalid_utf8(self) -> Probe:
        rng = self.rng
        junk = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                           b"\xe2\x82", b"\x80\x81\x82", b"\xfe\xff"])  # fmt: skip
        where = rng.randrange(4)
        if where == 0:
            raw = request("GET", b"/o/" + junk + b".gif")
        elif where == 1:
            raw = request("GET", b"/c/" + self._forged().encode() + junk)
        elif where == 2:
            raw = request("GET", b"/c/" + junk, [b"User-Agent: " + junk, b"X-" + junk + b": v"])
        else:
            raw = request("GET", b"/o/x.gif", [b"Host: " + junk, b"X-Forwarded-For: " + junk])
        return Probe("invalid-utf8", raw)

    def overlong_path(self) -> Probe:
        rng = self.rng
        prefix = rng.choice([b"/o/", b"/c/", b"/", b"/healthz/"])
        path = prefix + bytes(rng.choice(b"Aa0-_.%/") for _ in range(rng.randrange(3000, 120_000)))
        return Probe("overlong-path", request("GET", path))

    def percent_tricks(self) -> Probe:
        forged = self._forged()
        target = self.rng.choice([
            "/c/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/%63/" + forged, "/%6F/x.gif",
            "/o/%00.gif", "/c/%00", "/c/%252F%252Fevil.example", "/c//evil.example/",
            "/c/%2F%2Fevil.example", "/c/\\evil.example", "/c/%5C%5Cevil.example",
            "/c/https://evil.example/", "/c/https:%2F%2Fevil.example", "/c/%0d%0aLocation:%20"
            + EVIL, "/c/" + forged + "%0d%0aSet-Cookie:%20a=b", "/c/" + forged + "#frag",
            "/c/" + forged + ";jsessionid=1", "/C/" + forged, "/c/%", "/c/%zz", "/c/%e0%a0",
            "/./c/" + forged, "/o/../c/" + forged, "/c/..%2f..%2fmetrics", "/metrics%00",
            "/o/" + "%2e" * 500, "/c/" + forged + "?next=" + EVIL, "/c?url=" + EVIL,
            "/c/" + forged.replace(".", "%2E"),
        ])  # fmt: skip
        return Probe("percent-tricks", request("GET", target))

    def crlf_injection(self) -> Probe:
        forged = self._forged().encode()
        raw = self.rng.choice([
            b"GET /c/" + forged + b"\r\nLocation: " + EVIL.encode() + b" HTTP/1.1\r\n"
            b"Host: t\r\nConnection: close\r\n\r\n",
            b"GET /c/" + forged + b" HTTP/1.1\nHost: t\nConnection: close\n\n",  # bare LF
            b"GET /c/" + forged + b" HTTP/1.1\rHost: t\r\rConnection: close\r\r",  # bare CR
            request("GET", b"/c/" + forged, [b"X-A: v\rLocation: " + EVIL.encode()]),
            request("GET", b"/o/x.gif", [b"X-A: v", b" folded: Location: " + EVIL.encode()]),
            request("GET", b"/c/" + forged, [b"Host: a", b"Host: b"]),
            request("GET", b"/c/" + forged, [b"Content-Length: 5", b"Content-Length: 6"],
                    body=b"abcdef"),
            request("GET", b"/c/" + forged, [b"Transfer-Encoding: chunked",
                    b"Content-Length: 4"], body=b"0\r\n\r\nGET /c/x HTTP/1.1\r\nHost: t\r\n\r\n"),
            request("GET", b"/c/" + forged, [b"Transfer-Encoding: chunked, identity"],
                    body=b"0\r\n\r\n"),
            request("GET", b"/c/" + forged, [b"Transfer-Encoding : chunked"], body=b"0\r\n\r\n"),
            request("GET", b"/c/" + forged, [b"X-Forwarded-For: 1.2.3.4\r\nX-Injected: 1"]),
            request("GET", b"/c/" + forged, [b"X-Null: a\x00b"]),
        ])  # fmt: skip
        return Probe("crlf-injection", raw)

    def pipelined(self) -> Probe:
        n = self.rng.randrange(2, 6)
        parts = [request("GET", f"/c/{self._forged()}", [b"Connection: keep-alive"])
                 for _ in range(n - 1)]  # fmt: skip
        parts.append(request("GET", f"/o/{self._forged()}.gif"))
        return Probe("pipelined", b"".join(parts), answers=n)

    def junk(self) -> Probe:
        rng = self.rng
        raw = rng.choice([
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64),  # TLS hello
            b"GET /o/x.gif\r\n",  # HTTP/0.9
            b"GET /o/x.gif HTTP/1.0\r\n\r\n",  # no Host
            b"GET /o/x.gif HTTP/9.9\r\nHost: t\r\n\r\n",
            b"GET /o/x.gif HTTP/1.1 extra\r\nHost: t\r\n\r\n",
            b"\r\n" * 200 + request("GET", "/o/x.gif"),
            rng.randbytes(rng.randrange(1, 5000)),
            b"",
        ])  # fmt: skip
        return Probe("junk", raw)

    def batch(self, count: int, valid_share: float = 0.15) -> list[Probe]:
        makers = [self.forged, self.wrong_kind, self.head_of_valid, self.odd_method,
                  self.huge_headers, self.invalid_utf8, self.overlong_path, self.percent_tricks,
                  self.crlf_injection, self.pipelined, self.junk]  # fmt: skip
        return [
            self.valid_control() if self.rng.random() < valid_share else self.rng.choice(makers)()
            for _ in range(count)
        ]


def _flip(rng: random.Random, token: str) -> str:
    i = rng.randrange(len(token))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return token[:i] + rng.choice([c for c in alphabet if c != token[i]]) + token[i + 1 :]


def _other_b64(rng: random.Random, ch: str) -> str:
    """Another base64url character with the same high bits: the same bytes when the low
    bits are padding, a different spelling of them all the same."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    at = alphabet.index(ch)
    return alphabet[(at & ~0b11) | ((at + 1 + rng.randrange(3)) & 0b11)]


def _percent_some(rng: random.Random, token: str) -> str:
    """Percent-encode a few characters: the server decodes the path, so the token is
    still the valid one."""
    if rng.random() < 0.7:
        return token
    return "".join(f"%{ord(c):02X}" if rng.random() < 0.2 else c for c in token)


# The client -------------------------------------------------------------------------


async def exchange(host: str, port: int, probe: Probe) -> ProbeResult:
    outcome = ProbeResult(probe)
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        outcome.error = f"connect: {exc!r}"
        return outcome
    try:
        writer.write(probe.raw)
        await writer.drain()
        for _ in range(probe.answers):
            answer = await asyncio.wait_for(read_answer(reader, probe.head), READ_TIMEOUT_S)
            if answer is None:
                break
            outcome.answers.append(answer)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        outcome.error = repr(exc)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return outcome


async def read_answer(reader: asyncio.StreamReader, head: bool) -> Answer | None:
    try:
        block = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ValueError(f"truncated answer: {exc.partial[:200]!r}") from None
        return None  # closed without answering
    status_line, *lines = block.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    if not version.startswith("HTTP/"):
        raise ValueError(f"not an HTTP answer: {status_line!r}")
    headers = []
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
    answer = Answer(int(status), headers)
    length = answer.header("content-length")
    if length and not head and int(length[0]):
        await reader.readexactly(int(length[0]))
    return answer


async def slow_client(host: str, port: int, data: bytes, seconds: float) -> ProbeResult:
    """Sends ``data`` one byte a second for at most ``seconds``, then reads what comes."""
    probe = Probe("slow-client", data)
    outcome = ProbeResult(probe)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for i in range(min(len(data), int(seconds))):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(1.0)
        if len(data) <= int(seconds):
            head = data.startswith(b"HEAD ")
            answer = await asyncio.wait_for(read_answer(reader, head), READ_TIMEOUT_S)
            if answer is not None:
                outcome.answers.append(answer)
        else:
            outcome.error = "gave up sending"
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        outcome.error = repr(exc)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return outcome
