"""Ingest's listening sockets and what a worker's exit code means to its supervisor."""

from __future__ import annotations

import signal
import socket

import pytest

from ingest import listen
from ingest.supervisor import stopped_cleanly
from tests.servers import free_port


def test_a_taken_address_is_a_listen_error_naming_it_and_how_to_move() -> None:
    address = f"127.0.0.1:{free_port()}"
    first = listen.bind(address)
    try:
        with pytest.raises(listen.ListenError) as caught:
            listen.bind(address)
    finally:
        for sock in first:
            sock.close()
    message = str(caught.value)
    assert message.startswith(f"cannot listen on {address}: the address is already in use")
    assert message.endswith("choose another address with --listen or TRACKBUF_LISTEN")


def test_a_taken_address_is_refused_even_to_a_reuseport_socket_first() -> None:
    """A process that did take the port with SO_REUSEPORT (an older ingest) is found."""
    port = free_port()
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", port))
    other.listen()
    try:
        with pytest.raises(listen.ListenError):
            listen.bind(f"127.0.0.1:{port}")
    finally:
        other.close()


def test_the_socket_is_released_once_closed_and_handed_over_by_number() -> None:
    address = f"127.0.0.1:{free_port()}"
    sockets = listen.bind(address)
    environ = listen.worker_environ(sockets)
    assert environ == {listen.FDS_VARIABLE: str(sockets[0].fileno())}
    assert listen.inherited({}) is None
    [again] = listen.inherited(environ) or []
    assert again.getsockname() == sockets[0].getsockname()
    again.detach()  # same descriptor as sockets[0]: close it once
    sockets[0].close()
    for sock in listen.bind(address):  # free again at once (SO_REUSEADDR)
        sock.close()


@pytest.mark.parametrize(
    ("code", "clean"),
    [
        (0, True),
        (-signal.SIGTERM, True),  # stopped while still starting: nothing was served
        (-signal.SIGINT, True),
        (130, True),  # the CLI's answer to a KeyboardInterrupt while starting
        (1, False),  # ran out of shutdown_timeout
        (2, False),
        (-signal.SIGKILL, False),
        (-signal.SIGSEGV, False),
    ],
)
def test_which_worker_exit_codes_make_a_clean_stop(code: int, clean: bool) -> None:
    assert stopped_cleanly(code) is clean
