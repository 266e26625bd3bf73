"""Settings as they may be shown on a terminal: signing secrets and passwords masked."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
HIDDEN = "(set, not shown)"


def masked(name: str, value: str) -> str:
    """``value`` of setting ``name``, with whatever is secret in it replaced by ***."""
    if not value:
        return value
    if name == "signing_keys":
        # The key ids tell which key signs; the secrets stay out.
        kids = [part.strip().partition(":")[0] for part in value.split(",") if part.strip()]
        return ",".join(f"{kid}:{MASK}" for kid in kids)
    if name == "database_url":
        return masked_dsn(value)
    return value


def masked_dsn(dsn: str) -> str:
    """A URL DSN with its password masked (in the user info and a ``password=`` query
    parameter); anything not a URL is hidden whole, as it may hold a password anywhere."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return HIDDEN
    if not parts.scheme or not dsn.startswith(f"{parts.scheme}://"):
        return HIDDEN
    netloc = parts.netloc
    userinfo, at, hostinfo = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if at and colon and password:
        netloc = f"{user}:{MASK}@{hostinfo}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key == "password" for key, _ in pairs):
        masked_pairs = [(k, MASK if k == "password" else v) for k, v in pairs]
        query = urlencode(masked_pairs, safe="*/:")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
