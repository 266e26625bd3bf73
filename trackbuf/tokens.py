"""Link tokens: everything ingest needs to record an event, signed so it cannot be forged.

A token is ``<kid>.<payload>.<tag>``:

- ``kid`` names the key that signed it, so keys rotate without breaking old emails:
  one key signs, every configured key verifies.
- ``payload`` is base64url (unpadded) of a JSON list ``[1, kind, campaign, recipient]``
  or, for clicks, ``[1, "c", campaign, recipient, url]``.
- ``tag`` is HMAC-SHA256 over ``kid.payload``, truncated to 16 bytes (128 bits, as
  RFC 2104 allows) to keep URLs short.

No database is needed to verify a token, so clicks keep redirecting during an outage.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import orjson

FORMAT = 1
TAG_BYTES = 16
MAX_TOKEN = 4096
MAX_FIELD = 256
MAX_URL = 2048
# A secret shorter than the MAC's 32-byte output would be the weakest part of it.
MIN_SECRET_BYTES = 32
_KID = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
_KIND_CODES = {"open": "o", "click": "c"}
_CODE_KINDS = {code: kind for kind, code in _KIND_CODES.items()}


class InvalidToken(ValueError):
    """The token must not be trusted; ``reason`` is a short label for metrics and logs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeyringError(ValueError):
    """The key configuration cannot be used; the message says how to fix it."""


class LinkError(ValueError):
    """A link cannot be signed as asked (bad kind, field or target URL)."""


def new_key(kid: str = "k1") -> str:
    """A fresh ``kid:secret`` entry for TRACKBUF_SIGNING_KEYS (256 random bits)."""
    if not _KID.match(kid):
        raise KeyringError(f"kid {kid!r} must be 1-16 letters, digits, - or _")
    return f"{kid}:{secrets.token_urlsafe(32)}"


class HmacSha256:
    """HMAC-SHA256 (RFC 2104) with a key's inner and outer hash states computed once.

    ``hmac.digest`` sets up OpenSSL's MAC machinery on every call; copying two ready
    SHA-256 states is about 2.5x cheaper in a loop, and more than that inside a busy
    server, where verifying the token was trackbuf's largest cost per pixel.
    """

    __slots__ = ("_inner", "_outer")
    _IPAD = bytes(b ^ 0x36 for b in range(256))
    _OPAD = bytes(b ^ 0x5C for b in range(256))

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:  # the SHA-256 block size
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(key.translate(self._IPAD))
        self._outer = hashlib.sha256(key.translate(self._OPAD))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


@dataclass(frozen=True)
class Keyring:
    signing_kid: str
    keys: dict[str, bytes] = field(repr=False)  # secrets: never in a log line or traceback
    macs: dict[str, HmacSha256] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        macs = {kid: HmacSha256(secret) for kid, secret in self.keys.items()}
        object.__setattr__(self, "macs", macs)  # derived once; the dataclass is frozen

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        """``kid:secret[,kid:secret...]``; the first key signs.

        Errors name the key by its kid or its position, never by its secret: they end
        up in terminals and logs.
        """
        keys: dict[str, bytes] = {}
        first = ""
        for number, part in enumerate((p.strip() for p in spec.split(",") if p.strip()), 1):
            kid, sep, secret = part.partition(":")
            if not sep:
                raise KeyringError(f"key #{number}: expected kid:secret, found no ':'")
            if not _KID.match(kid):
                raise KeyringError(
                    f"key #{number}: the kid before ':' must be 1-16 letters, digits, - or _"
                )
            size = len(secret.encode())
            if size < MIN_SECRET_BYTES:
                raise KeyringError(
                    f"key {kid!r}: the secret is {size} bytes, at least {MIN_SECRET_BYTES} are "
                    "needed (`trackbuf keygen` makes one)"
                )
            if kid in keys:
                raise KeyringError(f"key {kid!r} is listed twice")
            keys[kid] = secret.encode()
            first = first or kid
        if not keys:
            raise KeyringError("no signing keys: set TRACKBUF_SIGNING_KEYS=kid:secret")
        return cls(signing_kid=first, keys=keys)


@dataclass(frozen=True, slots=True)
class LinkPayload:
    kind: str
    campaign: str
    recipient: str
    url: str | None = None


def sign(keyring: Keyring, payload: LinkPayload) -> str:
    if payload.url is not None:
        payload = LinkPayload(payload.kind, payload.campaign, payload.recipient,
                              ascii_url(payload.url))  # fmt: skip
    _check_payload(payload, error=LinkError)
    fields: list[object] = [FORMAT, _KIND_CODES[payload.kind], payload.campaign, payload.recipient]
    if payload.kind == "click":
        fields.append(payload.url)
    body = _b64encode(orjson.dumps(fields))
    kid = keyring.signing_kid
    signed = f"{kid}.{body}"
    token = f"{signed}.{_b64encode(_tag(keyring.macs[kid], signed))}"
    if len(token) > MAX_TOKEN:
        raise LinkError(f"token would be {len(token)} characters; ingest accepts {MAX_TOKEN}")
    return token


def verify(keyring: Keyring, token: str, kind: str) -> LinkPayload:
    """The payload of a token whose signature, format and kind all check out."""
    if len(token) > MAX_TOKEN:
        raise InvalidToken("too_long")
    signed, _, tag = token.rpartition(".")
    kid, dot, body = signed.partition(".")
    if not dot or "." in body:
        raise InvalidToken("malformed")  # not exactly three parts
    mac = keyring.macs.get(kid)
    if mac is None:
        raise InvalidToken("unknown_kid")
    # Compare the text, not decoded bytes: base64 has several spellings of the same
    # bytes (the unused low bits of the last character), and every spelling but ours
    # is a tampered token.
    expected = _b64encode(_tag(mac, signed))
    if not hmac.compare_digest(tag.encode(), expected.encode()):
        raise InvalidToken("bad_signature")
    # From here on the body is text this service signed, so it needs no syntax check
    # before decoding; the fields are still checked, as keys outlive code versions.
    try:
        fields = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise InvalidToken("malformed") from None
    payload = _payload_from(fields)
    if payload.kind != kind:
        raise InvalidToken("wrong_kind")
    return payload


def _payload_from(fields: object) -> LinkPayload:
    if not isinstance(fields, list) or len(fields) not in (4, 5) or fields[0] != FORMAT:
        raise InvalidToken("malformed")
    kind = _CODE_KINDS.get(fields[1]) if isinstance(fields[1], str) else None
    if kind is None:
        raise InvalidToken("malformed")
    url = fields[4] if len(fields) == 5 else None
    if isinstance(url, str):
        url = ascii_url(url)  # a target signed as an IRI still redirects
    payload = LinkPayload(kind=kind, campaign=fields[2], recipient=fields[3], url=url)
    _check_payload(payload, error=InvalidToken)
    return payload


def _check_payload(payload: LinkPayload, error: type[ValueError]) -> None:
    if payload.kind not in _KIND_CODES:
        raise error("bad_kind")
    for name in ("campaign", "recipient"):
        value = getattr(payload, name)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_FIELD:
            raise error(f"bad_{name}")
    if payload.kind == "click":
        if not isinstance(payload.url, str) or not is_safe_target(payload.url):
            raise error("bad_url")
    elif payload.url is not None:
        raise error("bad_url")


def ascii_url(url: str) -> str:
    """Percent-encode non-ASCII characters (an IRI becomes a URI) so the target can go
    into a Location header as it is; ASCII URLs are left exactly as given."""
    if url.isascii():
        return url
    return quote(url, safe="".join(chr(c) for c in range(0x21, 0x7F)))


def is_safe_target(url: str) -> bool:
    """Only absolute http(s) URLs with a host, no control characters or whitespace:
    anything else could turn the redirect into header injection or a javascript: link."""
    if (
        len(url) > MAX_URL
        or not url.isascii()
        or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url)
    ):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _tag(mac: HmacSha256, signed: str) -> bytes:
    """HMAC-SHA256 over ``kid.payload``, truncated."""
    return mac.digest(signed.encode())[:TAG_BYTES]


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
