"""The wire codec: how events travel inside beanstalkd jobs.

A job body is one JSON object, version 1::

    {"v":1,"n":2,"e":[{"id":"...","k":"open","t":"2026-...Z","c":"...","r":"..."}, ...]}

- ``v`` is the format version; readers reject versions they do not know.
- ``n`` is the number of events, so a consumer can size its batches without parsing
  the whole body.
- ``e`` holds the events with short keys (``id`` event_id, ``k`` kind, ``t`` occurred_at,
  ``c`` campaign, ``r`` recipient, ``u`` url, ``ua`` user agent, ``ip``, and ``p``
  ``"prefetch"`` when the request said it was one); absent keys are null. Short keys
  matter: every queued byte sits in beanstalkd's RAM. ``p`` is optional and new in
  version 1: jobs written before it decode as they did (no prefetch), and readers
  ignore keys they do not know, so the version stays 1.

The body is written so that PostgreSQL can read it as-is (``jsonb_to_recordset``); the
consumer never builds Python rows (it adds its verdicts with orjson,
consumer/verdicts.py). ``decode_job`` below decodes a body into ``Event`` objects, for
tests and tools that read what beanstalkd holds.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import orjson

from trackbuf.events import KINDS, Event, clip_user_agent, stamp

VERSION = 1
HEADER = b'{"v":1,"n":'
# Added around the joined events: the header, the count (up to 6 digits), the tail.
FRAME_BYTES = len(HEADER) + 6 + len(',"e":[') + len("]}")
# The largest job body trackbuf makes. beanstalkd's own default limit is 64 KiB; this
# bound is what ingest's local spool can always read back (a spool record holds one
# job body), so TRACKBUF_MAX_JOB_BYTES may not exceed it.
MAX_JOB_BYTES = 1 << 20
_HEADER_RE = re.compile(rb'\{"v":1,"n":(\d{1,6}),"e":\[')


class CodecError(ValueError):
    """A job body or event that cannot be read; the message is the reason."""


def encode_event(event: Event) -> bytes:
    return _encode(event.event_id, event.kind, event.occurred_at, event.campaign,
                   event.recipient, event.url, event.user_agent, event.ip,
                   event.prefetch)  # fmt: skip


def encode_new_event(
    kind: str,
    campaign: str,
    recipient: str,
    url: str | None = None,
    user_agent: str | None = None,
    ip: str | None = None,
    prefetch: bool = False,
) -> bytes:
    """``encode_event(new_event(...))`` without the Event in between: ingest's hot path,
    where building the frozen dataclass cost more than encoding it."""
    event_id, occurred_at = stamp()
    return _encode(event_id, kind, occurred_at, campaign, recipient, url,
                   clip_user_agent(user_agent), ip, prefetch)  # fmt: skip


def _encode(
    event_id: uuid.UUID,
    kind: str,
    occurred_at: datetime,
    campaign: str,
    recipient: str,
    url: str | None,
    user_agent: str | None,
    ip: str | None,
    prefetch: bool = False,
) -> bytes:
    item: dict[str, object] = {
        "id": event_id,  # orjson writes a UUID in C, 4x faster than str()
        "k": kind,
        "t": occurred_at,
        "c": campaign,
        "r": recipient,
    }
    if url is not None:
        item["u"] = url
    if user_agent is not None:
        item["ua"] = user_agent
    if ip is not None:
        item["ip"] = ip
    if prefetch:
        item["p"] = "prefetch"
    return orjson.dumps(item, option=orjson.OPT_UTC_Z)


_TIME_KEY = b'"t":"'


def first_event_time(body: bytes) -> float | None:
    """Unix time of the first event in a job, found without decoding the job.

    The consumer times end-to-end latency per job rather than per row: a job's events
    arrived while one put was in flight (milliseconds apart), and decoding every job
    just to time it would cost more than storing it. A quote inside a JSON string is
    escaped, so ``"t":"`` can only be a key.
    """
    at = body.find(_TIME_KEY)
    if at < 0:
        return None
    start = at + len(_TIME_KEY)
    end = body.find(b'"', start, start + 40)
    if end < 0:
        return None
    try:
        moment = datetime.fromisoformat(body[start:end].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def encode_job(encoded_events: list[bytes]) -> bytes:
    """Frame already-encoded events (from ``encode_event``) as one job body."""
    if not encoded_events:
        raise CodecError("a job needs at least one event")
    return b"".join(
        (HEADER, str(len(encoded_events)).encode(), b',"e":[', b",".join(encoded_events), b"]}")
    )


def job_ranges(sizes: list[int], max_bytes: int, max_events: int) -> list[tuple[int, int]]:
    """Cut a run of encoded events (their sizes in bytes) into jobs: ``(start, end)``
    index ranges whose framed body stays within ``max_bytes`` and ``max_events``.
    An event too big for any job on its own still gets a range of its own."""
    budget = max_bytes - FRAME_BYTES
    ranges: list[tuple[int, int]] = []
    start = size = 0
    for i, nbytes in enumerate(sizes):
        cost = nbytes + 1  # and its comma
        if i > start and (size + cost > budget or i - start >= max_events):
            ranges.append((start, i))
            start, size = i, 0
        size += cost
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def item_kind(item: object) -> str:
    """The kind of an undecoded event item, "open" when it cannot be told (used only
    to label counts of events that could not be stored)."""
    kind = item.get("k") if isinstance(item, dict) else None
    return kind if isinstance(kind, str) and kind in KINDS else "open"


def event_count(body: bytes) -> int | None:
    """The event count of a well-framed v1 body, or None if the frame is not ours.

    Cheap (a prefix match), so the consumer can batch by events without decoding.
    """
    match = _HEADER_RE.match(body)
    if match is None or not body.endswith(b"]}"):
        return None
    return int(match.group(1))


def decode_job(body: bytes) -> list[Event]:
    """Every event in a job body; raises CodecError naming the first problem."""
    return [decode_event(item) for item in decode_frame(body)]


def decode_frame(body: bytes) -> list[object]:
    """The undecoded event items of a job body, after checking the frame.

    Lets a reader keep the good events of a job that holds one bad event.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CodecError("job body is not a JSON object")
    version = doc.get("v")
    if version != VERSION:
        raise CodecError(f"unsupported wire version {version!r}")
    items = doc.get("e")
    if not isinstance(items, list):
        raise CodecError("job body has no event list")
    if doc.get("n") != len(items):
        raise CodecError(f"event count {doc.get('n')!r} does not match {len(items)} events")
    return items


def decode_event(item: object) -> Event:
    if not isinstance(item, dict):
        raise CodecError("event is not a JSON object")
    try:
        event_id = uuid.UUID(_text(item, "id"))
    except ValueError:
        raise CodecError(f"bad event id {item.get('id')!r}") from None
    kind = _text(item, "k")
    if kind not in KINDS:
        raise CodecError(f"bad kind {kind!r}")
    try:
        occurred_at = datetime.fromisoformat(_text(item, "t"))
    except ValueError:
        raise CodecError(f"bad timestamp {item.get('t')!r}") from None
    if occurred_at.tzinfo is None:
        raise CodecError("timestamp has no time zone")
    return Event(
        event_id=event_id,
        kind=kind,
        occurred_at=occurred_at,
        campaign=_text(item, "c"),
        recipient=_text(item, "r"),
        url=_optional_text(item, "u"),
        user_agent=_optional_text(item, "ua"),
        ip=_optional_text(item, "ip"),
        prefetch=item.get("p") == "prefetch",
    )


def _text(item: dict[str, object], key: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise CodecError(f"event field {key!r} must be a string")
    return value


def _optional_text(item: dict[str, object], key: str) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise CodecError(f"event field {key!r} must be a string or null")
    return value
