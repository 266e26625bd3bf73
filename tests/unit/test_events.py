from __future__ import annotations

import os
import uuid

import pytest

from ingest.pixel import GIF
from store.sql import parse
from trackbuf import events
from trackbuf.events import MAX_USER_AGENT, clean_ip, forwarded_address, new_event


@pytest.mark.parametrize(
    ("raw", "mode", "stored"),
    [
        ("203.0.113.77", "full", "203.0.113.77"),
        ("203.0.113.77", "anonymize", "203.0.113.0"),
        ("2001:db8:abcd:12:1:2:3:4", "anonymize", "2001:db8:abcd::"),
        ("203.0.113.77", "drop", None),
        ("not an ip", "full", None),
        (None, "full", None),
    ],
)
def test_ip_policy(raw: str | None, mode: str, stored: str | None) -> None:
    assert clean_ip(raw, mode) == stored


def test_user_agent_is_clipped() -> None:
    event = new_event("open", "c", "r", user_agent="x" * 10_000)
    assert event.user_agent is not None and len(event.user_agent) == MAX_USER_AGENT


def test_pixel_is_a_43_byte_gif() -> None:
    assert len(GIF) == 43 and GIF.startswith(b"GIF89a")


def test_named_queries_parse() -> None:
    text = "-- preamble\n-- name: a\nSELECT 1;\n\n-- name: b\nSELECT\n 2;\n"
    assert parse(text) == {"a": "SELECT 1", "b": "SELECT\n 2"}
    with pytest.raises(ValueError, match="defined twice"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")


def test_log_lines_stay_on_one_line() -> None:
    from trackbuf.log import kv

    line = kv("dead_letter", reason='bad "x"\nDETAIL: row', n=3)
    assert "\n" not in line
    assert line == 'event=dead_letter reason="bad \\"x\\"\\nDETAIL: row" n=3'


def test_uuid7_random_bits_are_not_shared_with_a_forked_child() -> None:
    # The ids' random bits come from a buffered page of os.urandom; a child that kept
    # its parent's page would hand out the parent's next ids.
    events.uuid7()  # make sure a page is buffered
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next id and leave at once
        os.write(write, str(events.uuid7(1)).encode())
        os._exit(0)
    os.close(write)
    child = uuid.UUID(os.read(read, 64).decode())
    os.close(read)
    os.waitpid(pid, 0)
    parent = events.uuid7(1)
    assert child.int & ((1 << 74) - 1) != parent.int & ((1 << 74) - 1)


def test_uuid7_ids_are_unique_across_page_refills() -> None:
    ids = {events.uuid7(1) for _ in range(5_000)}  # same millisecond, ~12 pages
    assert len(ids) == 5_000


@pytest.mark.parametrize(
    ("hop", "address"),
    [
        ("198.51.100.23", "198.51.100.23"),
        (" 198.51.100.23:51234", "198.51.100.23"),
        ("[2001:db8::7]:443", "2001:db8::7"),
        ("[2001:db8::7]", "2001:db8::7"),
        ("2001:db8::7", "2001:db8::7"),
        ("unknown", "unknown"),
    ],
)
def test_7_a_forwarded_hop_with_a_port_gives_its_address(hop: str, address: str) -> None:
    assert forwarded_address(hop) == address
    assert clean_ip(forwarded_address(hop), "full") == (None if address == "unknown" else address)
