"""The ingest HTTP app: pixel, click redirect, health, readiness, metrics.

Answers come from the token alone (no database), and only after the event is durable.
A tracking failure never breaks an email: the pixel is served whatever happens.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from ingest.enqueue import Enqueuer, Outcome
from ingest.metrics import IngestMetrics
from ingest.pixel import GIF, PIXEL_HEADERS
from ingest.spool import Spool
from trackbuf import codec, tokens
from trackbuf.events import clean_ip, new_event
from trackbuf.log import kv
from trackbuf.settings import Settings

log = logging.getLogger("trackbuf.ingest")

SETTINGS = web.AppKey("settings", Settings)
KEYRING = web.AppKey("keyring", tokens.Keyring)
ENQUEUER = web.AppKey("enqueuer", Enqueuer)
METRICS = web.AppKey("metrics", IngestMetrics)
REGISTRY = web.AppKey("registry", CollectorRegistry)


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


SHUTDOWN = web.AppKey("shutdown", ShutdownClock)

INVALID_LINK_PAGE = (
    "<!doctype html><title>Link not valid</title>"
    "<h1>This link is not valid</h1>"
    "<p>The tracking link is damaged or was not issued by this service. "
    "Please use the link from the original email.</p>"
)


def init_app(settings: Settings, registry: CollectorRegistry | None = None) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app[KEYRING] = tokens.Keyring.parse(settings.signing_keys)
    app[REGISTRY] = registry if registry is not None else CollectorRegistry()
    app[METRICS] = metrics = IngestMetrics.create(app[REGISTRY])
    app[SHUTDOWN] = ShutdownClock()

    app[ENQUEUER] = Enqueuer(
        settings.beanstalkd_address,
        settings.tube,
        ttr=settings.job_ttr,
        max_job_bytes=settings.max_job_bytes,
        metrics=metrics,
        spool=Spool(Path(settings.spool_path), settings.spool_max_bytes, settings.spool_fsync),
    )
    app.cleanup_ctx.append(_enqueuer_ctx)
    app.router.add_route("GET", "/o/{token}.gif", open_pixel)
    app.router.add_route("HEAD", "/o/{token}.gif", open_pixel)
    app.router.add_route("GET", "/c/{token}", click_redirect)
    app.router.add_route("HEAD", "/c/{token}", click_redirect)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


async def _enqueuer_ctx(app: web.Application) -> AsyncIterator[None]:
    enqueuer = app[ENQUEUER]
    await enqueuer.start()
    yield
    # Runs after the server stopped taking requests: flush what is still pending.
    timeout = app[SHUTDOWN].remaining(app[SETTINGS].shutdown_timeout)
    finished = await enqueuer.close(timeout)
    if not finished:
        app[SHUTDOWN].clean = False
        log.error(kv("enqueue_flush_timeout", timeout_s=round(timeout, 3)))


async def open_pixel(request: web.Request) -> web.Response:
    started = time.perf_counter()
    try:
        outcome = await _record(request, "open")
    except Exception:
        # Tracking must never break an email: whatever failed, the image loads. The
        # event is not stored, so it is counted and logged as lost.
        log.exception(kv("request_failed", route="open"))
        request.app[METRICS].event_counter("open", "lost").inc()
        log.error(kv("event_lost", kind="open", reason="request_failed"))
        outcome = "error"
    _observe(request, "open", outcome, started)
    return web.Response(body=GIF, headers=PIXEL_HEADERS)


async def click_redirect(request: web.Request) -> web.Response:
    started = time.perf_counter()
    app = request.app
    try:
        payload = tokens.verify(app[KEYRING], request.match_info["token"], "click")
    except tokens.InvalidToken as exc:
        app[METRICS].invalid_tokens.labels("click", exc.reason).inc()
        _observe(request, "click", "invalid_token", started)
        # Never redirect on a token we cannot trust: that would be an open redirect.
        return web.Response(
            status=404,
            text=INVALID_LINK_PAGE,
            content_type="text/html",
            headers={"Cache-Control": "no-store", "X-Robots-Tag": "noindex, nofollow"},
        )
    try:
        outcome = await _record(request, "click", payload)
    except Exception:
        # The token is valid, so the person still gets where they were going; the
        # event is counted and logged as lost.
        log.exception(kv("request_failed", route="click"))
        request.app[METRICS].event_counter("click", "lost").inc()
        log.error(kv("event_lost", kind="click", reason="request_failed"))
        outcome = "error"
    _observe(request, "click", outcome, started)
    assert payload.url is not None  # verify() guarantees a safe URL on click tokens
    return web.Response(
        status=302,
        headers={
            "Location": payload.url,
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Robots-Tag": "noindex, nofollow",
        },
    )


async def _record(
    request: web.Request, kind: str, payload: tokens.LinkPayload | None = None
) -> str:
    """Store the event of a valid request; returns the outcome label for metrics.

    HEAD requests are answered but not recorded: they come from link checkers and
    prefetchers, not from a person opening or clicking.
    """
    app = request.app
    if payload is None:
        try:
            payload = tokens.verify(app[KEYRING], request.match_info["token"], kind)
        except tokens.InvalidToken as exc:
            app[METRICS].invalid_tokens.labels(kind, exc.reason).inc()
            return "invalid_token"
    if request.method == "HEAD":
        return "not_recorded"
    settings = app[SETTINGS]
    event = new_event(
        kind,
        payload.campaign,
        payload.recipient,
        url=payload.url,
        user_agent=request.headers.get("User-Agent"),
        ip=_client_ip(request, settings),
    )
    # No timeout here: the enqueue task settles every future (its own I/O has
    # timeouts), and wait_for would cost a task per request on the hot path.
    outcome = await app[ENQUEUER].submit(codec.encode_event(event))
    app[METRICS].event_counter(kind, outcome.value).inc()
    if outcome is Outcome.LOST:
        log.error(kv("event_lost", kind=kind, campaign=payload.campaign))
    return outcome.value


def _client_ip(request: web.Request, settings: Settings) -> str | None:
    if settings.trust_forwarded:
        # All header lines: a proxy may add its own line after one the client sent.
        forwarded = ",".join(request.headers.getall("X-Forwarded-For", []))
        if forwarded:
            # The last hop is the one our own proxy appended; earlier ones are the
            # client's word and can be forged.
            return clean_ip(forwarded.rsplit(",", 1)[-1], settings.ip_mode)
    if settings.ip_mode == "full":
        return request.remote  # from the socket: already a valid address, no parsing
    return clean_ip(request.remote, settings.ip_mode)


def _observe(request: web.Request, route: str, outcome: str, started: float) -> None:
    metrics = request.app[METRICS]
    metrics.request_counter(route, outcome).inc()
    metrics.duration(route).observe(time.perf_counter() - started)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    enqueuer = request.app[ENQUEUER]
    if enqueuer.ready():
        return web.Response(text="ready\n")
    return web.Response(status=503, text="not ready: beanstalkd unreachable and spool full\n")


async def metrics_page(request: web.Request) -> web.Response:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several ingest processes share the port: whichever answers reports all.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
