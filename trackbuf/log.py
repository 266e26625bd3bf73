"""Structured logs: one event per line, ``event=name key=value ...``."""

from __future__ import annotations

import logging
import sys


def setup(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )


def kv(event: str, **fields: object) -> str:
    """Format one log event. Values with spaces, quotes or line breaks are quoted and
    escaped, so every event stays on one parseable line."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(ch in text for ch in ' "=\n\r\t'):
            escaped = text.replace("\\", "\\\\").replace('"', '\\"')
            escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
            text = f'"{escaped}"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
