"""Everything the fast path needs from aiohttp beyond its documented API, in one place.

The fast path (``ingest.fastpath``) serves a connection itself until a read it does not
take, then hands the connection to aiohttp for good. For that it relies on four things
aiohttp does not promise, all here: ``web.Server`` is the listener's protocol factory
(called once per connection), a ``RequestHandler`` made by it can be switched onto a
live transport and fed bytes already read, aiohttp's default keep-alive timeout is
``RequestHandler.__init__``'s default, and the Server header aiohttp writes. The unit
test tests/unit/test_aiohttp_adapter.py checks each of them, so an aiohttp release that
changes one fails there, by name, rather than as a fast path that quietly answers
differently.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_protocol import RequestHandler

__all__ = ["KEEPALIVE_S", "SERVER", "ConnectionServer", "hand_over"]

# aiohttp's own default for closing an idle connection (75 s up to 3.10.5, then 3630 s,
# to outlast the idle timeout of a proxy in front): fast connections and connections
# handed to aiohttp keep the same rule.
KEEPALIVE_S = float(
    inspect.signature(RequestHandler.__init__).parameters["keepalive_timeout"].default
)
# The Server header aiohttp adds to every answer; the fast path writes the same.
SERVER = f"Server: {SERVER_SOFTWARE}\r\n".encode()


class ConnectionServer(web.Server):
    """aiohttp's low-level server, whose connections start with a protocol of ours:
    ``connection()`` makes it, and ``aiohttp_handler()`` makes aiohttp's own."""

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        return self.connection()

    def connection(self) -> asyncio.Protocol:
        raise NotImplementedError

    def aiohttp_handler(self) -> RequestHandler:
        return super().__call__()


def hand_over(
    server: ConnectionServer,
    transport: asyncio.Transport,
    reads: list[bytes],
    write_paused: bool,
) -> None:
    """From now on aiohttp serves the connection on ``transport``, starting with
    ``reads``: the bytes read so far, one item per read, fed one by one as they came
    (aiohttp judges a read as a whole: a malformed request in it voids the requests
    before it, so reads must not be joined)."""
    handler = server.aiohttp_handler()
    transport.set_protocol(handler)
    handler.connection_made(transport)
    if write_paused:
        # The transport tells only its protocol of the time; aiohttp must know the
        # buffer is full, or it would not wait for the drain.
        cast(asyncio.BaseProtocol, handler).pause_writing()
    for data in reads:
        handler.data_received(data)
