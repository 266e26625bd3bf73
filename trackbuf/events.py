"""The event model: one open or one click, as ingest saw it."""

from __future__ import annotations

import ipaddress
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

KINDS = ("open", "click")
MAX_USER_AGENT = 512


@dataclass(frozen=True, slots=True)
class Event:
    event_id: uuid.UUID
    kind: str
    occurred_at: datetime
    campaign: str
    recipient: str
    url: str | None = None
    user_agent: str | None = None
    ip: str | None = None
    # The request said it was a prefetch (``Sec-Purpose``/``Purpose: prefetch``): a
    # browser or proxy loading ahead of a person, who may never look.
    prefetch: bool = False


class _RandomPool:
    """os.urandom bytes fetched a page at a time.

    One getrandom() syscall per event was the single largest cost trackbuf added to a
    pixel request under load (~7 us of ~85); a 4 KiB page serves 409 ids. The bytes
    are still the kernel's CSPRNG output, as RFC 9562 asks for UUIDv7. A forked child
    drops the inherited page, so two processes never hand out the same bytes.
    """

    PAGE = 4096

    def __init__(self) -> None:
        self._page = b""
        self._at = 0
        # Two threads handed the same slice would make two events with one id, and the
        # second would be dropped as a duplicate: the lock costs ~0.1 us.
        self._lock = threading.Lock()

    def take(self, n: int) -> bytes:
        with self._lock:
            at = self._at
            if at + n > len(self._page):
                self._page, at = os.urandom(self.PAGE), 0
            self._at = at + n
            return self._page[at : at + n]

    def forget(self) -> None:
        self._page, self._at = b"", 0
        self._lock = threading.Lock()  # a lock held by another thread at fork stays held


_random = _RandomPool()
os.register_at_fork(after_in_child=_random.forget)


def uuid7(unix_ms: int | None = None) -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48-bit millisecond time, then random bits.

    Time-ordered ids keep the primary-key index append-mostly, which is what makes
    bulk inserts into a large events table cheap.
    """
    ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
    rand = int.from_bytes(_random.take(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def uuid7_time(value: uuid.UUID) -> datetime:
    return datetime.fromtimestamp((value.int >> 80) / 1000, tz=UTC)


def clean_ip(raw: str | None, mode: str) -> str | None:
    """Apply the IP policy: ``full`` keeps it, ``anonymize`` zeroes the host part
    (IPv4 /24, IPv6 /48, as common analytics practice), ``drop`` stores nothing."""
    if raw is None or mode == "drop":
        return None
    try:
        addr = ipaddress.ip_address(raw.strip())
    except ValueError:
        return None
    if mode == "anonymize":
        prefix = 24 if addr.version == 4 else 48
        return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False).network_address)
    return str(addr)


def is_prefetch(purpose: str | None) -> bool:
    """``Sec-Purpose: prefetch`` (Chrome, also ``prefetch;anonymous-client-ip`` through
    its private prefetch proxy) or the older ``Purpose: prefetch``."""
    return purpose is not None and purpose.strip().lower().startswith("prefetch")


def forwarded_address(hop: str) -> str:
    """The address of one X-Forwarded-For hop, which proxies may write with a port:
    ``203.0.113.7:51234`` or ``[2001:db8::1]:443`` (RFC 7239 style) give the address
    alone; a bare IPv6 address (several colons, no brackets) is left as it is."""
    hop = hop.strip()
    if hop.startswith("["):
        end = hop.find("]")
        return hop[1:end] if end > 0 else hop
    if hop.count(":") == 1:
        return hop.split(":", 1)[0]
    return hop


def clip_user_agent(raw: str | None) -> str | None:
    """At most MAX_USER_AGENT characters of valid text. Header bytes that are not UTF-8
    reach us as lone surrogates (aiohttp decodes with surrogateescape); they become
    U+FFFD so the event can still be encoded and stored. None (not kept) and "" (none
    sent) stay apart: the consumer counts a request without an agent as a machine's,
    and an agent ingest did not keep (TRACKBUF_USER_AGENT_MODE=drop) as unknown."""
    if not raw:
        return raw
    if not raw.isascii():
        raw = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return raw[:MAX_USER_AGENT]


def stamp(now_ns: int | None = None) -> tuple[uuid.UUID, datetime]:
    """A new event's id and time: the UUIDv7 carries the same millisecond."""
    ns = time.time_ns() if now_ns is None else now_ns
    return uuid7(ns // 1_000_000), datetime.fromtimestamp(ns / 1e9, tz=UTC)


def new_event(
    kind: str,
    campaign: str,
    recipient: str,
    url: str | None = None,
    user_agent: str | None = None,
    ip: str | None = None,
    now_ns: int | None = None,
) -> Event:
    event_id, occurred_at = stamp(now_ns)
    return Event(
        event_id=event_id,
        kind=kind,
        occurred_at=occurred_at,
        campaign=campaign,
        recipient=recipient,
        url=url,
        user_agent=clip_user_agent(user_agent),
        ip=ip,
    )
