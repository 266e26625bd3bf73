"""Baseline servers measured side by side with trackbuf ingest.

- ``bare``: an aiohttp handler that returns the pixel (and, for clicks, a fixed
  redirect) and does nothing else; the ceiling for any aiohttp-based tracker in one
  process.
- ``lowlevel``: the same handler on aiohttp's low-level server (``web.Server``, no
  Application, no router), which is what trackbuf ingest runs on: the ceiling for
  ingest's own design.
- ``naive``: the design trackbuf replaces: verify the token, then one INSERT per
  request (open or click) through an asyncpg pool, answering after the INSERT. It is
  as fast as its database, and fails when its database does.

    python -m loadtest.baselines bare  --listen 127.0.0.1:18081
    python -m loadtest.baselines lowlevel --listen 127.0.0.1:18083
    python -m loadtest.baselines naive --listen 127.0.0.1:18082 --dsn postgresql://...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from ingest.pixel import GIF, PIXEL_HEADERS
from trackbuf import tokens
from trackbuf.events import Event, new_event

POOL = web.AppKey("pool", asyncpg.Pool)
KEYRING = web.AppKey("keyring", tokens.Keyring)

INSERT = """INSERT INTO events (event_id, kind, occurred_at, campaign, recipient, url,
                                user_agent, ip)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8::inet)"""


async def bare_pixel(request: web.BaseRequest) -> web.Response:
    return web.Response(body=GIF, headers=PIXEL_HEADERS)


BARE_TARGET = {"Location": "https://example.com/"}


async def bare_click(request: web.BaseRequest) -> web.Response:
    """A redirect that looks nothing up: clicks in a traffic mix cost the bare server
    what they cost any handler, not a 404 from its router."""
    return web.Response(status=302, headers=BARE_TARGET)


def bare_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/o/{token}.gif", bare_pixel)
    app.router.add_get("/c/{token}", bare_click)
    return app


async def _insert(request: web.Request, event: Event) -> None:
    """The naive design: the answer waits for the database, and an outage is an error."""
    await request.app[POOL].execute(
        INSERT, event.event_id, event.kind, event.occurred_at, event.campaign,
        event.recipient, event.url, event.user_agent, event.ip,
    )  # fmt: skip


async def naive_pixel(request: web.Request) -> web.Response:
    try:
        payload = tokens.verify(request.app[KEYRING], request.match_info["token"], "open")
    except tokens.InvalidToken:
        return web.Response(body=GIF, headers=PIXEL_HEADERS)
    event = new_event(
        "open", payload.campaign, payload.recipient,
        user_agent=request.headers.get("User-Agent"), ip=request.remote,
    )  # fmt: skip
    await _insert(request, event)
    return web.Response(body=GIF, headers=PIXEL_HEADERS)


async def naive_click(request: web.Request) -> web.Response:
    """The same design for a click: verify, INSERT, then redirect."""
    try:
        payload = tokens.verify(request.app[KEYRING], request.match_info["token"], "click")
    except tokens.InvalidToken:
        return web.Response(status=404)
    event = new_event(
        "click", payload.campaign, payload.recipient, url=payload.url,
        user_agent=request.headers.get("User-Agent"), ip=request.remote,
    )  # fmt: skip
    await _insert(request, event)
    assert payload.url is not None  # verify() gives every click its target
    return web.Response(status=302, headers={"Location": payload.url})


async def serve_lowlevel(host: str, port: int) -> None:
    runner = web.ServerRunner(web.Server(bare_pixel, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    await asyncio.Event().wait()  # until the benchmark stops the process


def naive_app(dsn: str, keys: str) -> web.Application:
    app = web.Application()
    app[KEYRING] = tokens.Keyring.parse(keys)

    async def pool(app: web.Application) -> AsyncIterator[None]:
        app[POOL] = await asyncpg.create_pool(dsn, min_size=4, max_size=16, command_timeout=5)
        yield
        await app[POOL].close()

    app.cleanup_ctx.append(pool)
    app.router.add_get("/o/{token}.gif", naive_pixel)
    app.router.add_get("/c/{token}", naive_click)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.baselines")
    parser.add_argument("kind", choices=("bare", "lowlevel", "naive"))
    parser.add_argument("--listen", required=True)
    parser.add_argument("--dsn", default=os.environ.get("TRACKBUF_DATABASE_URL", ""))
    parser.add_argument("--keys", default=os.environ.get("TRACKBUF_SIGNING_KEYS", ""))
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    host, port = args.listen.rsplit(":", 1)
    if args.kind == "lowlevel":
        asyncio.run(serve_lowlevel(host, int(port)))
        return
    app = bare_app() if args.kind == "bare" else naive_app(args.dsn, args.keys)
    web.run_app(app, host=host, port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
