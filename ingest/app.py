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
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from ingest.decide import NO_INDEX, TEXT, Answer, Decision, Record, Rules, decide
from ingest.enqueue import Enqueuer
from ingest.metrics import IngestMetrics
from ingest.outcomes import Outcome
from ingest.spool import Spool
from ingest.tally import RequestTally
from trackbuf import codec, tokens
from trackbuf.events import clean_ip, forwarded_address, is_prefetch
from trackbuf.instance import INSTANCE_ENV, INSTANCE_HEADER
from trackbuf.keys import load_keyring
from trackbuf.log import kv
from trackbuf.redirect_hosts import RedirectHosts
from trackbuf.settings import Settings

log = logging.getLogger("trackbuf.ingest")

TALLY_FLUSH_S = 1.0


def respond(answer: Answer) -> web.Response:
    """aiohttp's response for a decided answer (it adds Content-Length, Date, Server
    and Connection after the answer's headers, as the fast path does)."""
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


class ShutdownClock:
    """One deadline for the whole graceful stop: the server waits for in-flight
    requests and then the enqueuer flushes, and together they must fit in
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
        named = ((INSTANCE_HEADER, instance), *NO_INDEX) if instance else NO_INDEX
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = IngestMetrics.create(self.registry)
        self.tally = RequestTally(self.metrics)
        self._flusher: asyncio.Task[None] | None = None
        self.shutdown = ShutdownClock()
        spool = Spool(Path(settings.spool_path), settings.spool_max_bytes, settings.spool_fsync)
        self.enqueuer = Enqueuer.from_settings(settings, self.metrics, spool)
        self.rules = Rules(
            self.keyring,
            self.redirect_hosts,
            keep_user_agent=settings.user_agent_mode == "full",  # else stored as NULL
            health=Answer(200, (*named, TEXT), b"ok\n"),
            ready=self.enqueuer.ready,
        )

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
        self.rules = dataclasses.replace(self.rules, keyring=keyring)
        log.info(kv("signing_keys_reloaded", kids=",".join(keyring.keys), file=path))

    async def _flush_tally(self) -> None:
        # With several ingest processes, the one answering a scrape reads the others'
        # figures from their files: they must not fall further behind than this.
        while True:
            await asyncio.sleep(TALLY_FLUSH_S)
            self.tally.flush()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The public listener: /o/, /c/, /healthz, /readyz and /robots.txt, nothing
        else (/metrics is on the admin listener, ``handle_admin``). What to answer and
        record is ``ingest.decide``'s, as on the fast path."""
        started = time.perf_counter()
        headers = request.headers
        prefetch = is_prefetch(headers.get("Sec-Purpose") or headers.get("Purpose"))
        decision = decide(self.rules, request.method, request.path, headers.get("User-Agent"),
                          headers.getall("X-Forwarded-For", []), request.remote,
                          prefetch)  # fmt: skip
        record = decision.record
        if record is None:
            self.counted(decision, started)
            return respond(decision.answer)
        try:
            # No timeout here: the enqueuer settles every future (its own I/O has
            # timeouts), and wait_for would cost a task per request on the hot path.
            outcome = await self.submit(record)
        except Exception:
            self.record_failed(record.kind, started)
        else:
            self.record_outcome(record, outcome, started)
        return respond(decision.answer)

    async def handle_admin(self, request: web.BaseRequest) -> web.StreamResponse:
        """The private admin listener (``TRACKBUF_ADMIN_LISTEN``): /metrics, /healthz."""
        if request.path == "/metrics":
            return self.metrics_page()
        if request.path == "/healthz":
            return web.Response(text="ok\n")
        return web.Response(status=404, text="not found\n")

    def counted(self, decision: Decision, started: float) -> None:
        """Count a request that records nothing (an invalid token, a HEAD)."""
        route = decision.route
        if route is None:
            return
        if decision.invalid is not None:
            self.metrics.invalid_token_counter(route, decision.invalid).inc()
        self.tally_request(route, decision.label or "", started)

    def submit(self, record: Record) -> Awaitable[Outcome]:
        """Hand the event of a valid request to the enqueuer; its outcome once durable."""
        ip = self.client_ip(record.forwarded, record.remote)
        event = self.encode(record.kind, record.payload, record.user_agent, ip, record.prefetch)
        return self.enqueuer.submit(event)

    def record_failed(self, kind: str, started: float) -> None:
        """Called from an ``except`` block: whatever failed, tracking must never break
        an email (the pixel loads and a valid click still redirects). The event is not
        stored, so it is counted and logged as lost."""
        log.exception(kv("request_failed", route=kind))
        self.metrics.event_counter(kind, "lost").inc()
        log.error(kv("event_lost", kind=kind, reason="request_failed"))
        self.tally_request(kind, "error", started)

    def encode(
        self,
        kind: str,
        payload: tokens.LinkPayload,
        user_agent: str | None,
        ip: str | None,
        prefetch: bool = False,
    ) -> bytes:
        """The event of a request, encoded for a job (``prefetch``: the request said it
        was one, which the consumer counts as a machine's; ``user_agent`` as
        ``decide`` kept it)."""
        return codec.encode_new_event(
            kind,
            payload.campaign,
            payload.recipient,
            url=payload.url,
            user_agent=user_agent,
            ip=ip,
            prefetch=prefetch,
        )

    def record_outcome(self, record: Record, outcome: Outcome, started: float) -> None:
        """Count what became of an event handed to the enqueuer."""
        kind = record.kind
        if outcome is not Outcome.UNCONFIRMED:  # counted by the spool writer when it ends
            self.tally.event(kind, outcome.value)
        if outcome is Outcome.LOST:
            log.error(kv("event_lost", kind=kind, campaign=record.payload.campaign))
        self.tally_request(kind, outcome.value, started)

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

    def tally_request(self, route: str, outcome: str, started: float) -> None:
        """Count a finished request and its time since ``started``, by route and outcome."""
        self.tally.request(route, outcome, time.perf_counter() - started)

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
