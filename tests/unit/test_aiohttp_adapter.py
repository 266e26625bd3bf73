"""What ingest.aiohttp_adapter relies on in aiohttp, checked by name.

The fast path hands connections to aiohttp through things aiohttp does not document.
An aiohttp release that changes one of them must fail here, saying which, not show up
as a fast path that answers differently from aiohttp or drops a connection.
"""

from __future__ import annotations

import asyncio
import inspect

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ingest import aiohttp_adapter
from ingest.aiohttp_adapter import ConnectionServer, hand_over


def test_the_default_keepalive_timeout_is_a_number_on_request_handler_init() -> None:
    parameter = inspect.signature(RequestHandler.__init__).parameters.get("keepalive_timeout")
    assert parameter is not None, "RequestHandler.__init__ lost keepalive_timeout"
    assert isinstance(parameter.default, (int, float)), parameter
    assert aiohttp_adapter.KEEPALIVE_S == float(parameter.default) > 0


def test_the_server_header_is_aiohttps_own() -> None:
    assert aiohttp_adapter.SERVER.startswith(b"Server: Python/")
    assert b"aiohttp/" in aiohttp_adapter.SERVER and aiohttp_adapter.SERVER.endswith(b"\r\n")


def test_the_low_level_server_is_a_protocol_factory_making_request_handlers() -> None:
    call = inspect.signature(web.Server.__call__)
    assert list(call.parameters) == ["self"], "web.Server() takes arguments now"
    for name in ("connection_made", "data_received", "eof_received", "pause_writing",
                 "connection_lost"):  # fmt: skip
        assert callable(getattr(RequestHandler, name, None)), f"RequestHandler.{name} is gone"


def test_a_connection_handed_over_mid_way_is_answered_by_aiohttp_read_by_read() -> None:
    """A live hand-over: our protocol reads two reads, then gives the connection to
    aiohttp, which must answer both requests, the first before the malformed second
    voids nothing (reads are fed apart), then close on the malformed one."""

    class Ours(asyncio.Protocol):
        def __init__(self, server: ConnectionServer) -> None:
            self.server = server
            self.reads: list[bytes] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.reads.append(data)
            if b"GARBAGE" in data:
                hand_over(self.server, self.transport, self.reads, False)  # type: ignore[arg-type]

    class Server(ConnectionServer):
        def connection(self) -> asyncio.Protocol:
            return Ours(self)

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(text=f"seen {request.path}")

    async def scenario() -> bytes:
        server = Server(handler, access_log=None)
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # a read of its own
        writer.write(b"GARBAGE\r\n\r\n")
        got = await asyncio.wait_for(reader.read(), 5)  # to the server's end of file
        writer.close()
        listener.close()
        await server.shutdown(1)
        return got

    got = asyncio.run(scenario())
    assert got.startswith(b"HTTP/1.1 200 OK"), got
    assert b"seen /first" in got
    assert b"400 Bad Request" in got
