"""Tracking URLs for senders: an open pixel and click redirects, signed.

>>> keys = Keyring.parse("k1:a-long-random-secret-of-32-bytes-or-more")
>>> open_url("https://t.example.com", keys, "spring", "user-42")
'https://t.example.com/o/k1....gif'
"""

from __future__ import annotations

import re

from trackbuf.tokens import Keyring, LinkError, LinkPayload, sign

OPEN_PREFIX = "/o/"
OPEN_SUFFIX = ".gif"
CLICK_PREFIX = "/c/"

_DURATION = re.compile(r"^([0-9]{1,9})([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def open_url(
    public_url: str, keyring: Keyring, campaign: str, recipient: str, *, expires: int | None = None
) -> str:
    """``expires``: Unix seconds from which the link is refused (None: never)."""
    token = sign(keyring, LinkPayload("open", campaign, recipient, expires=expires))
    return f"{public_url.rstrip('/')}{OPEN_PREFIX}{token}{OPEN_SUFFIX}"


def click_url(
    public_url: str,
    keyring: Keyring,
    campaign: str,
    recipient: str,
    url: str,
    *,
    expires: int | None = None,
) -> str:
    """``expires``: Unix seconds from which the link is refused (None: never)."""
    token = sign(keyring, LinkPayload("click", campaign, recipient, url, expires))
    return f"{public_url.rstrip('/')}{CLICK_PREFIX}{token}"


def parse_duration(text: str) -> int:
    """Seconds in ``90d``, ``12h``, ``30m``, ``45s`` or ``2w``."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise LinkError(f"a duration is a positive number and a unit (s, m, h, d, w): {text!r}")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
