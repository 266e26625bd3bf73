"""Structured logs: one event per line, ``ts=... level=... logger=... event=name key=value``.

Every line a trackbuf process writes to stderr parses with :func:`parse`: the timestamp
is ISO-8601 UTC (no spaces, no local zone), values with spaces, quotes or control
characters are quoted and escaped, a traceback becomes one escaped ``exc=`` field, and
a library that logs free text gets ``event=unstructured msg="..."``. Log shippers
(Loki, Vector, fluent-bit) then split on newlines and never glue a traceback's lines
to the wrong event.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from types import TracebackType

# Quoted: empty values and anything with a space, quote, '=' or backslash; inside
# quotes, escapes for the usual controls and \xNN/\uNNNN for the rest. Python's
# str.splitlines() also breaks on \v, \f, \x1c-\x1e, \x85, \u2028 and \u2029, so
# every character that is not printable is escaped, not just \n.
_NEEDS_QUOTES = re.compile(r'[\s"=\\]|[^\x21-\x7e]')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_TO_ESCAPE = re.compile(r'[\\"]|[^\x20-\x7e]')
_UNESCAPES = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}

_KEY = r"[A-Za-z_][A-Za-z0-9_.]*"
_VALUE = r'"(?:[^"\\]|\\.)*"|[^\s"=\\]+'
_PAIR = re.compile(rf"({_KEY})=({_VALUE})")
_LINE = re.compile(rf"{_KEY}=(?:{_VALUE})(?: {_KEY}=(?:{_VALUE}))*")
_EVENT_FIRST = re.compile(rf"event=(?:{_VALUE})(?: |$)")


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    escaped = _ESCAPES.get(ch)
    if escaped is not None:
        return escaped
    if ch.isprintable():
        return ch  # printable non-ASCII (an accented name) stays readable
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def value(text: str) -> str:
    """One value as it appears after ``key=``."""
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + _TO_ESCAPE.sub(_escape_char, text) + '"'


def kv(event: str, **fields: object) -> str:
    """Format one log event. Values with spaces, quotes or line breaks are quoted and
    escaped, so every event stays on one parseable line."""
    parts = [f"event={value(event)}"]
    parts.extend(f"{key}={value(str(field))}" for key, field in fields.items())
    return " ".join(parts)


def _unescape(quoted: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(quoted):
        ch = quoted[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = quoted[i + 1]
        width = {"x": 2, "u": 4, "U": 8}.get(nxt)
        if width:
            out.append(chr(int(quoted[i + 2 : i + 2 + width], 16)))
            i += 2 + width
        else:
            out.append(_UNESCAPES.get(nxt, nxt))
            i += 2
    return "".join(out)


def parse(line: str) -> dict[str, str]:
    """The fields of one log line; ValueError if it is not ``key=value`` throughout."""
    if not _LINE.fullmatch(line):
        raise ValueError(f"not a key=value log line: {line!r}")
    fields: dict[str, str] = {}
    for key, raw in _PAIR.findall(line):
        fields[key] = _unescape(raw[1:-1]) if raw.startswith('"') else raw
    return fields


def utc_timestamp(created: float) -> str:
    """ISO-8601 UTC with milliseconds, e.g. ``2026-11-24T07:12:36.666Z``."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class KeyValueFormatter(logging.Formatter):
    """``ts level logger`` and then the event; tracebacks folded into ``exc=``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not (_EVENT_FIRST.match(message) and _LINE.fullmatch(message)):
            # aiohttp, asyncio and warnings log prose: keep it, as one quoted field.
            message = kv("unstructured", msg=message)
        line = (
            f"ts={utc_timestamp(record.created)} level={record.levelname} "
            f"logger={value(record.name)} {message}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += f" exc={value(record.exc_text)}"
        if record.stack_info:
            line += f" stack={value(self.formatStack(record.stack_info))}"
        return line


def _log_uncaught(
    kind: type[BaseException], exc: BaseException, tb: TracebackType | None, thread: str
) -> None:
    logging.getLogger("trackbuf").critical(
        kv("uncaught_exception", thread=thread, error=kind.__name__), exc_info=(kind, exc, tb)
    )


def _thread_hook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    _log_uncaught(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback, name)


def _main_hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    _log_uncaught(kind, exc, tb, "MainThread")


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Python prints warnings and uncaught exceptions straight to stderr, over many
    # lines; route them through the same one-line format.
    logging.captureWarnings(True)
    sys.excepthook = _main_hook
    threading.excepthook = _thread_hook
