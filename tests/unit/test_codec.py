from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from trackbuf import codec
from trackbuf.events import Event, new_event, uuid7, uuid7_time


def sample(**changes: object) -> Event:
    base = new_event(
        "click", "spring-sale", "user-42", url="https://shop.example/a?b=1",
        user_agent="Mozilla/5.0 (iPhone)", ip="203.0.113.9",
    )  # fmt: skip
    fields = {**{f: getattr(base, f) for f in base.__slots__}, **changes}
    return Event(**fields)  # type: ignore[arg-type]


def test_job_round_trip_keeps_every_field() -> None:
    events = [sample(), sample(kind="open", url=None, user_agent=None, ip=None)]
    body = codec.encode_job([codec.encode_event(e) for e in events])
    assert codec.decode_job(body) == events
    assert codec.event_count(body) == 2


def test_occurred_at_is_utc_with_microseconds() -> None:
    event = sample(occurred_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    item = orjson.loads(codec.encode_event(event))
    assert item["t"] == "2026-01-02T03:04:05.678901Z"
    assert codec.decode_event(item).occurred_at == event.occurred_at


def test_unknown_version_is_rejected() -> None:
    body = orjson.dumps({"v": 2, "n": 0, "e": []})
    with pytest.raises(codec.CodecError, match="unsupported wire version 2"):
        codec.decode_job(body)
    assert codec.event_count(body) is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"v":1,"n":1}', "no event list"),
        (b'{"v":1,"n":3,"e":[]}', "does not match"),
    ],
)
def test_broken_frames_name_the_problem(body: bytes, reason: str) -> None:
    with pytest.raises(codec.CodecError, match=reason):
        codec.decode_job(body)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"k": "bounce"}, "bad kind"),
        ({"id": "nope"}, "bad event id"),
        ({"t": "yesterday"}, "bad timestamp"),
        ({"t": "2026-01-01T00:00:00"}, "no time zone"),
        ({"c": 7}, "'c' must be a string"),
        ({"ua": ["x"]}, "'ua' must be a string or null"),
    ],
)
def test_bad_events_name_the_field(change: dict[str, object], reason: str) -> None:
    item = {**orjson.loads(codec.encode_event(sample())), **change}
    with pytest.raises(codec.CodecError, match=reason):
        codec.decode_event(item)


def test_event_count_only_trusts_our_frame() -> None:
    good = codec.encode_job([codec.encode_event(sample())] * 3)
    assert codec.event_count(good) == 3
    assert codec.event_count(good[:-1]) is None  # truncated
    assert codec.event_count(b'{"n":3,"v":1,"e":[]}') is None  # not our byte layout


def test_empty_job_is_refused() -> None:
    with pytest.raises(codec.CodecError):
        codec.encode_job([])


def test_uuid7_is_version_7_and_time_ordered() -> None:
    first = uuid7(1_700_000_000_000)
    second = uuid7(1_700_000_000_001)
    assert first.version == 7
    assert first.variant == uuid.RFC_4122
    assert first < second
    assert uuid7_time(first) == datetime.fromtimestamp(1_700_000_000, tz=UTC)


def test_first_event_time_reads_the_job_without_decoding_it() -> None:
    now_ns = 1_700_000_000_123_456_000
    first = new_event("open", "c", "r", now_ns=now_ns)
    later = new_event("open", "c", "r", now_ns=now_ns + 5_000_000)
    body = codec.encode_job([codec.encode_event(first), codec.encode_event(later)])
    assert codec.first_event_time(body) == pytest.approx(1_700_000_000.123456)


def test_first_event_time_is_not_fooled_by_a_value_that_looks_like_the_key() -> None:
    # A campaign before "t" (another writer's key order) holding the text "t":"...
    item = {"c": 'x"t":"1999-01-01T00:00:00Z', "t": "2023-11-14T22:13:20Z"}
    body = b'{"v":1,"n":1,"e":[' + orjson.dumps(item) + b"]}"
    assert codec.first_event_time(body) == 1_700_000_000.0


@pytest.mark.parametrize(
    "body", [b"", b"\x00garbage", b'{"v":1,"n":1,"e":[{"t":"yesterday"}]}', b'{"t":"2026']
)
def test_first_event_time_of_a_broken_job_is_none(body: bytes) -> None:
    assert codec.first_event_time(body) is None


def test_first_event_time_takes_a_time_without_zone_as_utc() -> None:
    body = b'{"v":1,"n":1,"e":[{"t":"2023-11-14T22:13:20"}]}'
    assert codec.first_event_time(body) == 1_700_000_000.0


def test_encode_new_event_is_encode_event_of_new_event() -> None:
    """Ingest's shortcut must write exactly what the Event route writes."""
    ua = "Mozilla/5.0 " + "x" * 600  # over the 512-character cap
    before = datetime.now(UTC)
    body = codec.encode_new_event("click", "c", "r", "https://x.example/", ua, "192.0.2.1")
    (event,) = codec.decode_job(codec.encode_job([body]))
    assert before <= event.occurred_at <= datetime.now(UTC)
    assert event.event_id.version == 7
    assert uuid7_time(event.event_id) == event.occurred_at.replace(
        microsecond=event.occurred_at.microsecond // 1000 * 1000
    )
    same = new_event("click", "c", "r", "https://x.example/", ua, "192.0.2.1")
    same = Event(event.event_id, same.kind, event.occurred_at, same.campaign, same.recipient,
                 same.url, same.user_agent, same.ip)  # fmt: skip
    assert codec.encode_event(same) == body
    assert event.user_agent is not None and len(event.user_agent) == 512


def test_a_prefetch_travels_with_its_event_and_older_jobs_are_not_prefetches() -> None:
    event = new_event("open", "c", "r", user_agent="Mozilla/5.0")
    marked = codec.encode_new_event("open", "c", "r", prefetch=True)
    assert orjson.loads(marked)["p"] == "prefetch"
    (item,) = codec.decode_job(codec.encode_job([marked]))
    assert item.prefetch is True
    # A job written before the key existed decodes as it always did.
    old = codec.encode_job([codec.encode_event(event)])
    assert b'"p"' not in old
    assert codec.decode_job(old) == [event] and codec.decode_job(old)[0].prefetch is False
