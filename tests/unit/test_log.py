"""Log lines: one event per line, key=value throughout, UTC timestamps, folded tracebacks."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trackbuf.log import KeyValueFormatter, kv, parse

ROOT = Path(__file__).resolve().parents[2]
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
# Everything str.splitlines() breaks on, and what a shell or a parser trips over.
AWKWARD = 'a b\nc\r\nd\te"f=g\\h\x0bi\x0cj\x1ck\x1dl\x1em\x85n\u2028o\u2029p\x00q\x7fré\U0001f600'


def test_kv_round_trips_awkward_values_on_one_line() -> None:
    line = kv("thing_happened", plain="x", awkward=AWKWARD, empty="", number=3, none=None)
    assert len(line.splitlines()) == 1 and "\n" not in line
    assert parse(line) == {
        "event": "thing_happened",
        "plain": "x",
        "awkward": AWKWARD,
        "empty": "",
        "number": "3",
        "none": "None",
    }


@pytest.mark.parametrize(
    "line",
    [
        "event=x error=ConnectionRefusedError(111, 'Connection refused')",  # unquoted space
        "ts=2026-11-24 07:12:36,666 level=INFO",  # logging's default asctime
        'event=x msg="unterminated',
        "event=x key=a=b",
        "free text",
    ],
)
def test_parse_rejects_what_is_not_key_value(line: str) -> None:
    with pytest.raises(ValueError):
        parse(line)


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("trackbuf.test", logging.ERROR, __file__, 1, msg, args, exc_info)
    rec.created = 1795504356.6668  # 2026-11-24T07:12:36.666Z (truncated, as logging does)
    return rec


def test_formatter_writes_utc_iso_timestamps_and_the_event() -> None:
    line = KeyValueFormatter().format(record(kv("database_down", worker=2)))
    assert line == (
        "ts=2026-11-24T07:12:36.666Z level=ERROR logger=trackbuf.test event=database_down worker=2"
    )
    assert list(parse(line))[:4] == ["ts", "level", "logger", "event"]


def test_formatter_folds_a_traceback_into_one_exc_field() -> None:
    line = KeyValueFormatter().format(record(kv("request_failed", route="open"), exc=True))
    assert len(line.splitlines()) == 1
    fields = parse(line)
    assert fields["event"] == "request_failed" and fields["route"] == "open"
    assert fields["exc"].startswith("Traceback (most recent call last):\n")
    assert fields["exc"].endswith("ValueError: bad\nvalue")


def test_formatter_quotes_free_text_from_libraries() -> None:
    line = KeyValueFormatter().format(record("Error handling %s\nsecond line", "request"))
    fields = parse(line)
    assert fields["event"] == "unstructured"
    assert fields["msg"] == "Error handling request\nsecond line"


def test_warnings_and_uncaught_exceptions_are_one_line_events() -> None:
    # Python prints these over many lines unless setup() routes them through logging.
    script = (
        "import threading, warnings\n"
        "from trackbuf import log\n"
        "log.setup()\n"
        "thread = threading.Thread(target=lambda: 1 / 0, name='worker-1')\n"
        "thread.start(); thread.join()\n"
        "warnings.warn('careful\\nnow')\n"
        "raise RuntimeError('boom\\nline two')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 3, done.stderr
    events = [parse(line) for line in lines]
    assert all(TS.fullmatch(e["ts"]) for e in events)
    assert [(e["event"], e.get("thread")) for e in events] == [
        ("uncaught_exception", "worker-1"),
        ("unstructured", None),
        ("uncaught_exception", "MainThread"),
    ]
    assert "ZeroDivisionError" in events[0]["exc"]
    assert "careful\nnow" in events[1]["msg"]
    assert events[2]["exc"].endswith("RuntimeError: boom\nline two")
