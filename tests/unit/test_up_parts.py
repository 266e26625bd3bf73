"""`trackbuf up`'s own checks, against real sockets and processes: addresses in use,
the data-dir lock, telling its own ingest from another server, the env file's owner."""

from __future__ import annotations

import http.server
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from commands import up
from trackbuf import envfile
from trackbuf.settings import load


def free_address() -> str:
    """A port nothing listens on now: these checks must not meet whatever holds a
    default port (8080, 9107, 9108) on the machine running the tests."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_an_address_in_use_is_named_with_the_setting_that_moves_it() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        settings = load({}, overrides={
            "listen": free_address(), "admin_listen": free_address(), "metrics_listen": address,
        })  # fmt: skip
        with pytest.raises(up.UpError) as error:
            up.check_addresses(settings)
    assert str(error.value) == (
        f"{address} is already in use (consumer metrics); "
        "move it with --metrics-listen or TRACKBUF_METRICS_LISTEN"
    )


def test_ingest_and_consumer_on_one_address_is_refused() -> None:
    shared = free_address()
    settings = load({}, overrides={
        "listen": shared, "admin_listen": free_address(), "metrics_listen": shared,
    })  # fmt: skip
    with pytest.raises(up.UpError, match=re.escape(f"both on {shared}")):
        up.check_addresses(settings)


def test_the_data_dir_lock_names_its_owner(tmp_path: Path) -> None:
    fd = up.lock_data_dir(tmp_path)
    try:
        with pytest.raises(up.UpError, match=f"another trackbuf up \\(pid {os.getpid()}\\)"):
            up.lock_data_dir(tmp_path)
    finally:
        os.close(fd)
    os.close(up.lock_data_dir(tmp_path))  # free again once the owner is gone


class Answers(http.server.BaseHTTPRequestHandler):
    instance = ""

    def do_GET(self) -> None:
        self.send_response(200)
        if self.instance:
            self.send_header(up.INSTANCE_HEADER, self.instance)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def other_server() -> Iterator[tuple[str, type[Answers]]]:
    handler = type("Handler", (Answers,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_another_server_answering_healthz_is_not_taken_for_ingest(
    other_server: tuple[str, type[Answers]],
) -> None:
    address, _ = other_server
    with pytest.raises(up.UpError, match=f"{address} answers, but not as the ingest"):
        up.wait_own_ingest(address, "nonce-1", [], timeout=0.5)


def test_its_own_ingest_is_recognised(other_server: tuple[str, type[Answers]]) -> None:
    address, handler = other_server
    handler.instance = "nonce-1"
    up.wait_own_ingest(address, "nonce-1", [], timeout=5)


def test_env_file_owner_must_be_alive_and_the_same_process(tmp_path: Path) -> None:
    path = tmp_path / envfile.ENV_FILE
    envfile.write(path, {"TRACKBUF_PUBLIC_URL": "http://x"})
    found = envfile.read(str(tmp_path))
    assert found.stale == "" and found.values == {"TRACKBUF_PUBLIC_URL": "http://x"}

    text = path.read_text()
    started = envfile.process_start(os.getpid())
    path.write_text(text.replace(f"STARTED={started}", "STARTED=1"))  # a reused pid
    assert "is gone" in envfile.read(str(tmp_path)).stale

    proc = subprocess.Popen(["true"])
    proc.wait()
    path.write_text(text.replace(f"PID={os.getpid()}", f"PID={proc.pid}"))
    found = envfile.read(str(tmp_path))
    assert f"pid {proc.pid}" in found.stale and found.values == {}

    path.write_text("TRACKBUF_PUBLIC_URL=http://x\n")  # no owner recorded
    assert "no owner" in envfile.read(str(tmp_path)).stale
