"""Link tokens: everything ingest needs to record an event, signed so it cannot be forged.

A token is ``<kid>.<payload>.<tag>`` (docs/TOKENS.md specifies it byte for byte):

- ``kid`` names the key that signed it, so keys rotate without breaking old emails:
  one key signs, every configured key verifies.
- ``payload`` is base64url (unpadded) of a compact JSON list ``[1, kind, campaign,
  recipient]``, for clicks ``[1, "c", campaign, recipient, url]``, either followed by
  an expiry (Unix seconds) when the link has one.
- ``tag`` is HMAC-SHA256 over ``kid.payload``, truncated to 16 bytes (128 bits, as
  RFC 2104 allows) to keep URLs short.

Every payload has exactly one spelling: a token is accepted only if re-encoding what it
decodes to gives back the very characters received, so no two URLs mean the same link.
No database is needed to verify a token, so clicks keep redirecting during an outage.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import orjson

FORMAT = 1
TAG_BYTES = 16
TAG_CHARS = 22  # base64url of 16 bytes, unpadded
MAX_TOKEN = 4096
MAX_FIELD = 256
MAX_URL = 2048
# A secret shorter than the MAC's 32-byte output would be the weakest part of it.
MIN_SECRET_BYTES = 32
# Every integer in a payload is one that JavaScript numbers (IEEE doubles) hold exactly,
# so any sender's JSON library reads and writes it the same: a larger one is refused as
# malformed whatever its size, rather than as whatever orjson's 64-bit range makes it.
MAX_SAFE_INTEGER = 2**53 - 1
MAX_EXPIRES = MAX_SAFE_INTEGER
_KID = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
# Control characters, space, DEL and backslash: never in a target (is_safe_target).
_UNSAFE_URL_CHAR = re.compile(r"[\x00-\x20\x7f\\]")
# A target's authority after its user info: a host (a bracketed IPv6 address, or a name
# with no ':', '[' or ']'), then an optional port of at most five digits.
_HOST_PORT = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|[^\[\]:]+)(?::([0-9]{0,5}))?")
# ascii_url percent-encodes only non-ASCII characters: an ASCII control character or
# space stays, so is_safe_target refuses it whether or not the URL also has an 'é'.
_ASCII = "".join(map(chr, range(0x80)))
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
            raise KeyringError(
                "no signing keys: set TRACKBUF_SIGNING_KEYS=kid:secret "
                "or TRACKBUF_SIGNING_KEYS_FILE"
            )
        return cls(signing_kid=first, keys=keys)


@dataclass(frozen=True, slots=True)
class LinkPayload:
    kind: str
    campaign: str
    recipient: str
    url: str | None = None
    expires: int | None = None  # Unix seconds; from then on the token is refused


def sign(keyring: Keyring, payload: LinkPayload) -> str:
    if payload.url is not None:
        if not _is_text(payload.url):  # a lone surrogate: no UTF-8 to percent-encode
            raise LinkError("bad_url")
        payload = LinkPayload(payload.kind, payload.campaign, payload.recipient,
                              ascii_url(payload.url), payload.expires)  # fmt: skip
    _check_payload(payload, error=LinkError)
    fields: list[object] = [FORMAT, _KIND_CODES[payload.kind], payload.campaign, payload.recipient]
    if payload.kind == "click":
        fields.append(payload.url)
    if payload.expires is not None:
        fields.append(payload.expires)
    body = _b64encode(orjson.dumps(fields))
    kid = keyring.signing_kid
    signed = f"{kid}.{body}"
    token = f"{signed}.{_b64encode(_tag(keyring.macs[kid], signed))}"
    if len(token) > MAX_TOKEN:
        raise LinkError(f"token would be {len(token)} characters; ingest accepts {MAX_TOKEN}")
    return token


def verify(keyring: Keyring, token: str, kind: str, now: float | None = None) -> LinkPayload:
    """The payload of a token whose signature, spelling, format, kind and expiry all
    check out; ``now`` (Unix seconds) defaults to the clock."""
    if len(token) > MAX_TOKEN:
        raise InvalidToken("too_long")
    if not token.isascii():
        raise InvalidToken("malformed")  # every token character is base64url, '.' or kid
    signed, _, tag = token.rpartition(".")
    kid, dot, body = signed.partition(".")
    if not dot or "." in body or len(tag) != TAG_CHARS:
        raise InvalidToken("malformed")  # not three parts, or a cut or extended tag
    mac = keyring.macs.get(kid)
    if mac is None:
        raise InvalidToken("unknown_kid")
    # Compare the text, not decoded bytes: base64 has several spellings of the same
    # bytes (the unused low bits of the last character), and every spelling but ours
    # is a tampered token. compare_digest: the time taken says nothing about the tag.
    expected = _b64encode(_tag(mac, signed))
    if not hmac.compare_digest(tag.encode(), expected.encode()):
        raise InvalidToken("bad_signature")
    fields = _decode_fields(body)
    # The MAC covers the text, so only a key holder can make a second spelling (padding,
    # other trailing bits, '+' for '-', spaces or escapes in the JSON, ...): a sender
    # whose encoder differs from the spec. Refused, so a link has exactly one URL.
    if _b64encode(orjson.dumps(fields)) != body:
        raise InvalidToken("non_canonical")
    payload = _payload_from(fields)
    if payload.kind != kind:
        raise InvalidToken("wrong_kind")
    if payload.expires is not None and (time.time() if now is None else now) >= payload.expires:
        raise InvalidToken("expired")
    return payload


def _decode_fields(body: str) -> list[int | str]:
    """The payload's JSON list, if it is one of integers (within +-(2**53 - 1)) and
    strings only (no bools, floats or nesting: those have spellings the canonical check
    could not rule out)."""
    try:
        fields = orjson.loads(_b64decode(body))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are ValueErrors
        raise InvalidToken("malformed") from None
    if not isinstance(fields, list):
        raise InvalidToken("malformed")
    for f in fields:  # a loop, not all() over a generator: half the time on every request
        if type(f) is int:
            if not -MAX_SAFE_INTEGER <= f <= MAX_SAFE_INTEGER:
                raise InvalidToken("malformed")
        elif type(f) is not str:
            raise InvalidToken("malformed")
    return fields


def _payload_from(fields: list[int | str]) -> LinkPayload:
    """``[1, kind, campaign, recipient, url if click, expires if any]``, checked."""
    if len(fields) < 4 or fields[0] != FORMAT or not isinstance(fields[1], str):
        raise InvalidToken("malformed")
    kind = _CODE_KINDS.get(fields[1])
    campaign, recipient, rest = fields[2], fields[3], fields[4:]
    if kind is None or not isinstance(campaign, str) or not isinstance(recipient, str):
        raise InvalidToken("malformed")
    url = None
    if kind == "click":
        target = rest.pop(0) if rest else None
        if not isinstance(target, str):
            raise InvalidToken("malformed")
        url = ascii_url(target)  # a target signed as an IRI still redirects
    expires = None
    if rest:
        if len(rest) != 1 or not isinstance(rest[0], int):
            raise InvalidToken("malformed")
        expires = rest[0]
    payload = LinkPayload(kind, campaign, recipient, url, expires)
    _check_payload(payload, error=InvalidToken)
    return payload


def _check_payload(payload: LinkPayload, error: type[ValueError]) -> None:
    if payload.kind not in _KIND_CODES:
        raise error("bad_kind")
    for name in ("campaign", "recipient"):
        value = getattr(payload, name)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_FIELD or not _is_text(value):
            raise error(f"bad_{name}")
    if payload.kind == "click":
        if not isinstance(payload.url, str) or not is_safe_target(payload.url):
            raise error("bad_url")
    elif payload.url is not None:
        raise error("bad_url")
    expires = payload.expires
    if expires is not None and (type(expires) is not int or not 0 < expires <= MAX_EXPIRES):
        raise error("bad_expires")


def _is_text(value: str) -> bool:
    """Encodable as UTF-8 (a Python str may hold lone surrogates; JSON text may not)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def ascii_url(url: str) -> str:
    """Percent-encode non-ASCII characters (an IRI becomes a URI) so the target can go
    into a Location header as it is; ASCII URLs are left exactly as given."""
    if url.isascii():
        return url
    return quote(url, safe=_ASCII)


def is_safe_target(url: str) -> bool:
    """Only absolute http(s) URLs with a host, no control characters, whitespace or
    backslashes: anything else could turn the redirect into header injection or a
    javascript: link. A backslash is refused because browsers read it as '/' in http(s)
    URLs and Python does not, so the two would disagree on the host.

    The host and port are checked here rather than left to urlsplit, whose checks
    differ between Python releases (3.11.4 began refusing a bracketed host that is not
    an IP address): docs/TOKENS.md states the rule, and every verifier must agree."""
    # One regex scan, not a Python loop over characters: a click's target is checked on
    # every click, and the loop was a third of verify()'s time for a typical URL.
    if len(url) > MAX_URL or not url.isascii() or _UNSAFE_URL_CHAR.search(url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https"):
        return False
    userinfo, _, host_port = parts.netloc.rpartition("@")
    found = _HOST_PORT.fullmatch(host_port)
    if found is None or "[" in userinfo or "]" in userinfo:
        return False
    ipv6, port = found.groups()
    if port and int(port) > 65535:
        return False
    if ipv6 is not None:
        try:
            ipaddress.IPv6Address(ipv6)  # no zone: the pattern has no '%'
        except ValueError:
            return False
    return True


def _tag(mac: HmacSha256, signed: str) -> bytes:
    """HMAC-SHA256 over ``kid.payload``, truncated."""
    return mac.digest(signed.encode())[:TAG_BYTES]


# base64's urlsafe functions are Python wrappers around binascii; calling binascii
# directly takes two Python calls off each of verify()'s three base64 steps.
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _b64encode(raw: bytes) -> str:
    return binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    """Base64url, also read in the standard alphabet ('+', '/') and with any '=' at the
    end, ignoring the spare bits: every such spelling is then refused as non_canonical.
    Any other character, or a length no base64 has, is a ValueError (malformed). Strict,
    not binascii's lenient default, whose answer for stray characters depended on where
    they stood and how many there were: no other language's decoder could match it."""
    data = text.encode().translate(_FROM_URLSAFE).rstrip(b"=")
    return binascii.a2b_base64(data + b"=" * (-len(data) % 4), strict_mode=True)
