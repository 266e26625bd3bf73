"""The ingest HTTP app: pixel, click redirect, health, readiness, metrics.

Answers come from the token alone (no database), and only after the event is durable.
A tracking failure never breaks an email: the pixel is served whatever happens.

It runs on aiohttp's low-level server with a dispatch of its own. Five fixed paths need
no router, and ``web.Application``'s routing, middleware and signal machinery cost
about a tenth of the CPU a pixel takes under load (measured here: a bare handler on the
low-level server answers ~1.35x the requests/s of the same handler in an Application).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from ingest.enqueuers import AnyEnqueuer, make_enqueuer
from ingest.metrics import IngestMetrics
from ingest.outcomes import Outcome
from ingest.pixel import GIF, PIXEL_HEADERS
from ingest.spool import Spool
from ingest.tally import RequestTally
from trackbuf import codec, tokens
from trackbuf.events import clean_ip, forwarded_address, is_prefetch
from trackbuf.instance import INSTANCE_ENV, INSTANCE_HEADER
from trackbuf.keys import load_keyring
from trackbuf.links import CLICK_PREFIX, OPEN_PREFIX, OPEN_SUFFIX
from trackbuf.log import kv
from trackbuf.redirect_hosts import RedirectHosts
from trackbuf.settings import Settings

log = logging.getLogger("trackbuf.ingest")

READ_METHODS = ("GET", "HEAD")
TALLY_FLUSH_S = 1.0

INVALID_LINK_PAGE = (
    '<!doctype html><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width,initial-scale=1">'
    "<title>Link not valid</title>"
    "<h1>This link is not valid</h1>"
    "<p>The tracking link is damaged, has expired or was not issued by this service. "
    "Please use the link from the original email.</p>"
)
# Every public answer carries this: a tracking host has nothing a search engine should
# index or follow (robots.txt says the same to crawlers that read it).
NO_INDEX = {"X-Robots-Tag": "noindex, nofollow"}
NO_STORE = {"Cache-Control": "no-store", **NO_INDEX}
ROBOTS_TXT = "User-agent: *\nDisallow: /\n"


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


def redirect_answer(url: str) -> web.Response:
    """The 302 for a target click_target() returned."""
    return web.Response(
        status=302, headers={"Location": url, "Referrer-Policy": "no-referrer", **NO_STORE}
    )


def invalid_link_answer() -> web.Response:
    return web.Response(
        status=404, text=INVALID_LINK_PAGE, content_type="text/html", headers=NO_STORE
    )


class ShutdownClock:
    """One deadline for the whole graceful stop: the server waits for in-flight
    requests and then the enqueue task flushes, and together they must fit in
    ``shutdown_timeout`` rather than each taking all of it."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.clean = True  # False once any part of the stop ran out of time

    def start(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout

    def remaining(self, default: float) -> float:
        if self.deadline is None:
            return default
        # Past the deadline, still a moment to flush: what is pending then belongs to
        # requests that were never answered, so this is best effort, not a promise.
        return max(self.deadline - time.monotonic(), 0.1)


class Ingest:
    """Everything a request needs, built once from the settings."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.keyring = load_keyring(settings)
        self.redirect_hosts = RedirectHosts.parse(settings.redirect_hosts)
        # Set by `trackbuf up`, which waits for its own ingest, not any server on the port.
        instance = os.environ.get(INSTANCE_ENV)
        self._health_headers = {INSTANCE_HEADER: instance, **NO_INDEX} if instance else NO_INDEX
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = IngestMetrics.create(self.registry)
        self.tally = RequestTally(self.metrics)
        self._flusher: asyncio.Task[None] | None = None
        self.shutdown = ShutdownClock()
        self._keep_user_agent = settings.user_agent_mode == "full"  # else stored as NULL
        spool = Spool(Path(settings.spool_path), settings.spool_max_bytes, settings.spool_fsync)
        self.enqueuer: AnyEnqueuer = make_enqueuer(settings, self.metrics, spool)

    async def start(self) -> None:
        await self.enqueuer.start()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_tally())

    async def close(self) -> None:
        """Flush what is still pending; runs after the server stopped taking requests."""
        timeout = self.shutdown.remaining(self.settings.shutdown_timeout)
        if not await self.enqueuer.close(timeout):
            self.shutdown.clean = False
            log.error(kv("enqueue_flush_timeout", timeout_s=round(timeout, 3)))
        if self._flusher is not None:
            self._flusher.cancel()
        self.tally.flush()

    def reload_keys(self) -> None:
        """On SIGHUP: re-read TRACKBUF_SIGNING_KEYS_FILE. A file that cannot be used is
        logged and the keys in use stay, so a half-written file never stops clicks."""
        path = self.settings.signing_keys_file
        if not path:
            log.warning(kv("signing_keys_not_reloaded", reason="no signing keys file is set"))
            return
        try:
            keyring = load_keyring(self.settings)
        except tokens.KeyringError as exc:
            log.error(kv("signing_keys_not_reloaded", error=str(exc)))
            return
        self.keyring = keyring
        log.info(kv("signing_keys_reloaded", kids=",".join(keyring.keys), file=path))

    async def _flush_tally(self) -> None:
        # With several ingest processes, the one answering a scrape reads the others'
        # figures from their files: they must not fall further behind than this.
        while True:
            await asyncio.sleep(TALLY_FLUSH_S)
            self.tally.flush()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The public listener: /o/, /c/, /healthz, /readyz and /robots.txt, nothing
        else (/metrics is on the admin listener, ``handle_admin``)."""
        path = request.path
        if request.method not in READ_METHODS:
            return web.Response(
                status=405, text="method not allowed\n", headers={"Allow": "GET, HEAD", **NO_INDEX}
            )
        if path.startswith(OPEN_PREFIX):
            # Whatever follows /o/ gets the pixel: a mangled path is an invalid token
            # (counted), never a broken image in someone's email.
            token = path[len(OPEN_PREFIX) :].removesuffix(OPEN_SUFFIX)
            return await self.open_pixel(request, token)
        if path.startswith(CLICK_PREFIX):
            return await self.click_redirect(request, path[len(CLICK_PREFIX) :])
        if path == "/healthz":
            return web.Response(text="ok\n", headers=self._health_headers)
        if path == "/readyz":
            return self.readyz()
        if path == "/robots.txt":
            return web.Response(text=ROBOTS_TXT, headers=NO_INDEX)
        return web.Response(status=404, text="not found\n", headers=NO_INDEX)

    async def handle_admin(self, request: web.BaseRequest) -> web.StreamResponse:
        """The private admin listener (``TRACKBUF_ADMIN_LISTEN``): /metrics, /healthz."""
        if request.path == "/metrics":
            return self.metrics_page()
        if request.path == "/healthz":
            return web.Response(text="ok\n")
        return web.Response(status=404, text="not found\n")

    async def open_pixel(self, request: web.BaseRequest, token: str) -> web.Response:
        started = time.perf_counter()
        outcome = await self._record_or_count_loss(request, "open", token)
        self.observe("open", outcome, started)
        return web.Response(body=GIF, headers=PIXEL_HEADERS)

    async def click_redirect(self, request: web.BaseRequest, token: str) -> web.Response:
        started = time.perf_counter()
        try:
            payload, target = click_target(self.keyring, self.redirect_hosts, token)
        except tokens.InvalidToken as exc:
            self.metrics.invalid_token_counter("click", exc.reason).inc()
            self.observe("click", "invalid_token", started)
            # Never redirect on a token we cannot trust: that would be an open redirect.
            return invalid_link_answer()
        outcome = await self._record_or_count_loss(request, "click", token, payload)
        self.observe("click", outcome, started)
        return redirect_answer(target)

    async def _record_or_count_loss(
        self,
        request: web.BaseRequest,
        kind: str,
        token: str,
        payload: tokens.LinkPayload | None = None,
    ) -> str:
        try:
            return await self._record(request, kind, token, payload)
        except Exception:
            return self.record_failed(kind)

    def record_failed(self, kind: str) -> str:
        """Called from an ``except`` block: whatever failed, tracking must never break
        an email (the pixel loads and a valid click still redirects). The event is not
        stored, so it is counted and logged as lost."""
        log.exception(kv("request_failed", route=kind))
        self.metrics.event_counter(kind, "lost").inc()
        log.error(kv("event_lost", kind=kind, reason="request_failed"))
        return "error"

    async def _record(
        self,
        request: web.BaseRequest,
        kind: str,
        token: str,
        payload: tokens.LinkPayload | None = None,
    ) -> str:
        """Store the event of a valid request; returns the outcome label for metrics.

        HEAD requests are answered but not recorded: they come from link checkers and
        prefetchers, not from a person opening or clicking.
        """
        if payload is None:
            payload = self.verified(kind, token)
            if payload is None:
                return "invalid_token"
        if request.method == "HEAD":
            return "not_recorded"
        user_agent = request.headers.get("User-Agent")
        forwarded = request.headers.getall("X-Forwarded-For", [])
        headers = request.headers
        prefetch = is_prefetch(headers.get("Sec-Purpose") or headers.get("Purpose"))
        ip = self.client_ip(forwarded, request.remote)
        event = self.encode(kind, payload, user_agent, ip, prefetch)
        # No timeout here: the enqueue task settles every future (its own I/O has
        # timeouts), and wait_for would cost a task per request on the hot path.
        outcome = await self.enqueuer.submit(event)
        return self.settled(kind, outcome, payload)

    def verified(self, kind: str, token: str) -> tokens.LinkPayload | None:
        """The payload of a valid token; None (counted) for any other."""
        try:
            return tokens.verify(self.keyring, token, kind)
        except tokens.InvalidToken as exc:
            self.metrics.invalid_token_counter(kind, exc.reason).inc()
            return None

    def encode(
        self,
        kind: str,
        payload: tokens.LinkPayload,
        user_agent: str | None,
        ip: str | None,
        prefetch: bool = False,
    ) -> bytes:
        """The event of a request, encoded for a job (``prefetch``: the request said it
        was one, which the consumer counts as a machine's). A request with no
        User-Agent is recorded with an empty one; with TRACKBUF_USER_AGENT_MODE=drop
        none is recorded at all, so the consumer can tell "sent none" (a script) from
        "not kept" (unknown)."""
        return codec.encode_new_event(
            kind,
            payload.campaign,
            payload.recipient,
            url=payload.url,
            user_agent=(user_agent or "") if self._keep_user_agent else None,
            ip=ip,
            prefetch=prefetch,
        )

    def settled(self, kind: str, outcome: Outcome, payload: tokens.LinkPayload) -> str:
        """Count what became of an event handed to the enqueuer; its outcome label."""
        if outcome is not Outcome.UNCONFIRMED:  # counted by the spool writer when it ends
            self.tally.event(kind, outcome.value)
        if outcome is Outcome.LOST:
            log.error(kv("event_lost", kind=kind, campaign=payload.campaign))
        return outcome.value

    def client_ip(self, forwarded: list[str], remote: str | None) -> str | None:
        """The address to store: from the socket or, with ``trust_forwarded``, the last
        hop of ``forwarded`` (every X-Forwarded-For line); then the IP policy."""
        settings = self.settings
        mode = settings.ip_mode
        # Only behind a proxy of your own: X-Forwarded-For is the client's word otherwise.
        if forwarded and settings.trust_forwarded:
            # All header lines: a proxy may add its own line after one the client sent.
            # The last hop is the one our own proxy appended; earlier ones are the
            # client's word and can be forged.
            joined = ",".join(forwarded)
            if joined:
                return clean_ip(forwarded_address(joined.rsplit(",", 1)[-1]), mode)
        if mode == "full":
            return remote  # from the socket: already a valid address, no parsing
        return clean_ip(remote, mode)

    def observe(self, route: str, outcome: str, started: float) -> None:
        self.tally.request(route, outcome, time.perf_counter() - started)

    def readyz(self) -> web.Response:
        if self.enqueuer.ready():
            return web.Response(text="ready\n", headers=NO_INDEX)
        return web.Response(
            status=503,
            text="not ready: no beanstalkd server reachable and spool full\n",
            headers=NO_INDEX,
        )

    def metrics_page(self) -> web.Response:
        self.tally.flush()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Several ingest processes share the port: whichever answers reports all.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            body = generate_latest(registry)
        else:
            body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
