"""Tracking URLs for senders: an open pixel and click redirects, signed.

>>> keys = Keyring.parse("k1:a-long-random-secret-of-32-bytes-or-more")
>>> open_url("https://t.example.com", keys, "spring", "user-42")
'https://t.example.com/o/k1....gif'
"""

from __future__ import annotations

from trackbuf.tokens import Keyring, LinkPayload, sign

OPEN_PREFIX = "/o/"
OPEN_SUFFIX = ".gif"
CLICK_PREFIX = "/c/"


def open_url(public_url: str, keyring: Keyring, campaign: str, recipient: str) -> str:
    token = sign(keyring, LinkPayload("open", campaign, recipient))
    return f"{public_url.rstrip('/')}{OPEN_PREFIX}{token}{OPEN_SUFFIX}"


def click_url(public_url: str, keyring: Keyring, campaign: str, recipient: str, url: str) -> str:
    token = sign(keyring, LinkPayload("click", campaign, recipient, url))
    return f"{public_url.rstrip('/')}{CLICK_PREFIX}{token}"
