"""What ingest answers to a request, and which event it records: one decision.

Ingest has two HTTP paths (aiohttp's handler in ``ingest.app`` and the fast path in
``ingest.fastpath``). Both parse the request their own way, call ``decide`` with what
every request has (method, path, user agent, X-Forwarded-For lines, the peer's address),
and then only write bytes: the answer and the event to record come from here, so the
two cannot drift apart. Keep-alive is the parser's matter, not the decision's: it is
settled by the HTTP/1.x rules both parsers implement (``ingest.fastpath`` hands anything
it does not read exactly as aiohttp does to aiohttp).

No I/O here: the event is recorded, and counted, by the caller (``Ingest.record``), and
the answer is written only once the event is durable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from ingest.pixel import GIF, PIXEL_HEADERS
from trackbuf import tokens
from trackbuf.links import CLICK_PREFIX, OPEN_PREFIX, OPEN_SUFFIX
from trackbuf.redirect_hosts import RedirectHosts

READ_METHODS = ("GET", "HEAD")
INVALID_LINK_PAGE = (
    '<!doctype html><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width,initial-scale=1">'
    "<title>Link not valid</title>"
    "<h1>This link is not valid</h1>"
    "<p>The tracking link is damaged, has expired or was not issued by this service. "
    "Please use the link from the original email.</p>"
)
ROBOTS_TXT = "User-agent: *\nDisallow: /\n"
# Every public answer carries this: a tracking host has nothing a search engine should
# index or follow (robots.txt says the same to crawlers that read it).
NO_INDEX = (("X-Robots-Tag", "noindex, nofollow"),)
NO_STORE = (("Cache-Control", "no-store"), *NO_INDEX)
TEXT = ("Content-Type", "text/plain; charset=utf-8")

Headers = tuple[tuple[str, str], ...]


class Answer:
    """Status, headers in the order they are written and body. Content-Length, Date,
    Server and Connection follow them, added by whichever path writes the answer.
    ``wire`` is the same, prepared once: the status line after the HTTP version and the
    header lines through Content-Length, for the fast path to write as it is."""

    __slots__ = ("body", "headers", "status", "wire")

    def __init__(self, status: int, headers: Headers, body: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.wire = _status_line(status) + _header_lines(headers, len(body))


def _status_line(status: int) -> bytes:
    return f" {status} {HTTPStatus(status).phrase}\r\n".encode()


def _header_lines(headers: Headers, length: int) -> bytes:
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    return ("".join(lines) + f"Content-Length: {length}\r\n").encode()


def text(status: int, body: str, headers: Headers = NO_INDEX) -> Answer:
    return Answer(status, (*headers, TEXT), body.encode())


PIXEL = Answer(200, tuple(PIXEL_HEADERS.items()), GIF)
INVALID_LINK = Answer(
    404, (("Content-Type", "text/html; charset=utf-8"), *NO_STORE), INVALID_LINK_PAGE.encode()
)
NOT_FOUND = text(404, "not found\n")
METHOD_NOT_ALLOWED = text(405, "method not allowed\n", (("Allow", "GET, HEAD"), *NO_INDEX))
ROBOTS = text(200, ROBOTS_TXT)
READY = text(200, "ready\n")
NOT_READY = text(503, "not ready: no beanstalkd server reachable and spool full\n")

_REDIRECT_REST = (("Referrer-Policy", "no-referrer"), *NO_STORE)
_REDIRECT_TOP = _status_line(302) + b"Location: "
_REDIRECT_TAIL = b"\r\n" + _header_lines(_REDIRECT_REST, 0)


def redirect(url: str) -> Answer:
    """The 302 to a target ``click_target`` returned: the one answer made per request,
    so its wire bytes are joined from prepared parts."""
    answer = Answer.__new__(Answer)
    answer.status, answer.body = 302, b""
    answer.headers = (("Location", url), *_REDIRECT_REST)
    # click_target() gives only printable ASCII without spaces.
    answer.wire = _REDIRECT_TOP + url.encode() + _REDIRECT_TAIL
    return answer


def click_target(
    keyring: tokens.Keyring, hosts: RedirectHosts, token: str, now: float | None = None
) -> tuple[tokens.LinkPayload, str]:
    """The payload of a click that may be followed, and where it goes: signed, spelled
    canonically, not expired, its target a safe http(s) URL on a host the allowlist
    accepts. Anything else raises InvalidToken: the click route never redirects to a
    target that was not signed."""
    payload = tokens.verify(keyring, token, "click", now)
    url = payload.url
    if url is None:  # verify() gives every click a URL; a None must not become "None"
        raise tokens.InvalidToken("bad_url")
    if not hosts.allows(url):
        raise tokens.InvalidToken("host_not_allowed")
    return payload, url


@dataclass(frozen=True, slots=True)
class Rules:
    """What a decision depends on besides the request."""

    keyring: tokens.Keyring
    redirect_hosts: RedirectHosts
    keep_user_agent: bool  # else the event stores none
    health: Answer  # /healthz: may name the instance (`trackbuf up` waits for its own)
    ready: Callable[[], bool]  # /readyz: can an event be stored now?


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 us a request
class Record:
    """The event to record; its client address is worked out where it is encoded."""

    kind: str
    payload: tokens.LinkPayload
    user_agent: str | None
    forwarded: list[str]  # every X-Forwarded-For line, in order
    remote: str | None  # the peer's address
    prefetch: bool  # Sec-Purpose / Purpose: prefetch (counted as a machine's)


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 us a request
class Decision:
    answer: Answer
    route: str | None = None  # "open" or "click": a tracking request, counted per route
    record: Record | None = None
    label: str | None = None  # the outcome counted when nothing is recorded
    invalid: str | None = None  # why a token was refused (counted)


def decide(
    rules: Rules,
    method: str,
    path: str,
    user_agent: str | None,
    forwarded: list[str],
    remote: str | None,
    prefetch: bool = False,
) -> Decision:
    """The public listener's answer to a request, and the event it records.

    HEAD requests are answered but not recorded: they come from link checkers and
    prefetchers, not from a person opening or clicking.
    """
    if method not in READ_METHODS:
        return Decision(METHOD_NOT_ALLOWED)
    if path.startswith(OPEN_PREFIX):
        # Whatever follows /o/ gets the pixel: a mangled path is an invalid token
        # (counted), never a broken image in someone's email.
        token = path[len(OPEN_PREFIX) :].removesuffix(OPEN_SUFFIX)
        try:
            payload = tokens.verify(rules.keyring, token, "open")
        except tokens.InvalidToken as exc:
            return Decision(PIXEL, "open", label="invalid_token", invalid=exc.reason)
        answer = PIXEL
        kind = "open"
    elif path.startswith(CLICK_PREFIX):
        try:
            payload, target = click_target(
                rules.keyring, rules.redirect_hosts, path[len(CLICK_PREFIX) :]
            )
        except tokens.InvalidToken as exc:
            # Never redirect on a token we cannot trust: that would be an open redirect.
            return Decision(INVALID_LINK, "click", label="invalid_token", invalid=exc.reason)
        answer = redirect(target)
        kind = "click"
    elif path == "/healthz":
        return Decision(rules.health)
    elif path == "/readyz":
        return Decision(READY if rules.ready() else NOT_READY)
    elif path == "/robots.txt":
        return Decision(ROBOTS)
    else:
        return Decision(NOT_FOUND)
    if method == "HEAD":
        return Decision(answer, kind, label="not_recorded")
    # No header is kept as "" (sent none: the consumer counts a script), and with
    # TRACKBUF_USER_AGENT_MODE=drop nothing is kept (None: unknown), so the two differ.
    agent = (user_agent or "") if rules.keep_user_agent else None
    return Decision(answer, kind, Record(kind, payload, agent, forwarded, remote, prefetch))
