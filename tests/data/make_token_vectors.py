"""Writes tests/data/token_vectors.json: link tokens made from docs/TOKENS.md alone.

    python tests/data/make_token_vectors.py

Tokens are built here with the standard library (json, hmac, base64), not with
trackbuf.tokens, so the vectors check trackbuf's signer and verifier against the spec
rather than against themselves. tests/unit/test_token_vectors.py reads the committed
file, and fails if this script would now write something else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

PATH = Path(__file__).with_name("token_vectors.json")
PUBLIC_URL = "https://t.example.com"
NOW = 1767225600  # 2026-01-01T00:00:00Z: verify the vectors as of this second
DAY = 86400
KEYS = {
    "k1": "k1-secret-for-the-token-test-vectors-0001",
    "k2": "k2-secret-for-the-token-test-vectors-0002",
}
OTHER_SECRET = "not-the-k1-secret-but-as-long-as-one-000"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def canonical_json(fields: list[Any]) -> str:
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)


def tag(secret: str, signed: str) -> str:
    mac = hmac.new(secret.encode("utf-8"), signed.encode("ascii"), hashlib.sha256)
    return b64url(mac.digest()[:16])


def token_for(kid: str, payload: str, secret: str | None = None) -> str:
    """A token whose tag is right for ``payload`` exactly as given (any spelling)."""
    signed = f"{kid}.{payload}"
    return f"{signed}.{tag(KEYS.get(kid, OTHER_SECRET) if secret is None else secret, signed)}"


def fields_of(kind: str, campaign: str, recipient: str, url: str | None, expires: int | None
              ) -> list[Any]:  # fmt: skip
    fields: list[Any] = [1, "o" if kind == "open" else "c", campaign, recipient]
    if kind == "click":
        fields.append(url)
    if expires is not None:
        fields.append(expires)
    return fields


def valid(name: str, kid: str, kind: str, campaign: str, recipient: str,
          url: str | None = None, expires: int | None = None) -> dict[str, Any]:  # fmt: skip
    text = canonical_json(fields_of(kind, campaign, recipient, url, expires))
    payload = b64url(text.encode("utf-8"))
    token = token_for(kid, payload)
    link = f"{PUBLIC_URL}/o/{token}.gif" if kind == "open" else f"{PUBLIC_URL}/c/{token}"
    return {
        "name": name, "kid": kid, "kind": kind, "campaign": campaign, "recipient": recipient,
        "url": url, "expires": expires, "json": text, "payload": payload,
        "mac_input": f"{kid}.{payload}", "tag": token.rsplit(".", 1)[1], "token": token,
        "link": link,
    }  # fmt: skip


def invalid(name: str, kind: str, token: str, reason: str) -> dict[str, str]:
    return {"name": name, "kind": kind, "token": token, "reason": reason}


def from_json(text: str) -> str:
    return b64url(text.encode("utf-8"))


def invalid_vectors(open_: dict[str, Any], click: dict[str, Any]) -> list[dict[str, str]]:
    ot, ct = open_["token"], click["token"]
    kid, payload, good_tag = ot.split(".")
    flipped = ("B" if good_tag[0] == "A" else "A") + good_tag[1:]
    padded = base64.urlsafe_b64encode(open_["json"].encode()).decode()
    assert padded.endswith("="), "pick an open vector whose payload needs padding"
    last = payload[-1]
    spare = payload[:-1] + chr(ord(last) + 1)  # same bytes: only spare low bits differ
    assert base64.urlsafe_b64decode(spare + "==") == open_["json"].encode()
    dashed = valid("-", "k1", "open", "spring", "user??>>")  # its payload holds '_' or '-'
    standard = dashed["payload"].replace("-", "+").replace("_", "/")
    assert standard != dashed["payload"]
    tampered = from_json(open_["json"].replace("spring", "sprinG"))
    late = valid("-", "k1", "click", "spring", "user-42", "https://shop.example/", NOW)
    gone = valid("-", "k1", "click", "spring", "user-42", "https://shop.example/", NOW - 1)
    return [
        invalid("tag with one character changed", "open", f"{kid}.{payload}.{flipped}",
                "bad_signature"),
        invalid("payload changed, tag kept", "open", f"{kid}.{tampered}.{good_tag}",
                "bad_signature"),
        invalid("signed with another secret under the same kid", "open",
                token_for("k1", payload, OTHER_SECRET), "bad_signature"),
        invalid("kid not configured", "open", token_for("k9", payload), "unknown_kid"),
        invalid("tag truncated by one character", "open", ot[:-1], "malformed"),
        invalid("tag extended by one character", "open", ot + "A", "malformed"),
        invalid("no tag", "open", f"{kid}.{payload}", "malformed"),
        invalid("four parts", "open", f"{ot}.{good_tag}", "malformed"),
        invalid("cut in the payload", "click", ct[: len(ct) // 2], "malformed"),
        invalid("payload base64url with '=' padding (tag right for it)", "open",
                token_for("k1", padded), "non_canonical"),
        invalid("payload with other spare bits in its last character", "open",
                token_for("k1", spare), "non_canonical"),
        invalid("payload in the standard base64 alphabet ('+', '/')", "open",
                token_for("k1", standard), "non_canonical"),
        invalid("JSON with spaces", "open",
                token_for("k1", from_json('[1, "o", "spring", "user-42"]')), "non_canonical"),
        invalid("JSON with a needless escape", "open",
                token_for("k1", from_json('[1,"o","\\u0073pring","user-42"]')), "non_canonical"),
        invalid("JSON with an escaped '/'", "click",
                token_for("k1", from_json('[1,"c","s","r","https:\\/\\/shop.example\\/"]')),
                "non_canonical"),
        invalid("format 1.0 instead of 1", "open",
                token_for("k1", from_json('[1.0,"o","spring","user-42"]')), "malformed"),
        invalid("format 2", "open",
                token_for("k1", from_json('[2,"o","spring","user-42"]')), "malformed"),
        invalid("a JSON object, not an array", "open",
                token_for("k1", from_json('{"kind":"o"}')), "malformed"),
        invalid("open with a URL", "open",
                token_for("k1", from_json('[1,"o","s","r","https://shop.example/"]')),
                "malformed"),
        invalid("expiry as a string", "open",
                token_for("k1", from_json('[1,"o","s","r","1767225600"]')), "malformed"),
        invalid("click without a URL", "click",
                token_for("k1", from_json('[1,"c","s","r"]')), "malformed"),
        invalid("empty campaign", "open",
                token_for("k1", from_json('[1,"o","","r"]')), "bad_campaign"),
        invalid("expiry 0", "open",
                token_for("k1", from_json('[1,"o","s","r",0]')), "bad_expires"),
        invalid("target scheme javascript:", "click",
                token_for("k1", from_json('[1,"c","s","r","javascript:alert(1)"]')), "bad_url"),
        invalid("target scheme-relative", "click",
                token_for("k1", from_json('[1,"c","s","r","//evil.example/"]')), "bad_url"),
        invalid("target with CR LF", "click",
                token_for("k1", from_json(canonical_json(
                    [1, "c", "s", "r", "https://a.example/\r\nSet-Cookie: x=1"]))), "bad_url"),
        invalid("target with a backslash", "click",
                token_for("k1", from_json(canonical_json(
                    [1, "c", "s", "r", "https://evil.example\\@shop.example/"]))), "bad_url"),
        invalid("target without a host", "click",
                token_for("k1", from_json('[1,"c","s","r","https:///path"]')), "bad_url"),
        invalid("open token at the click route", "click", ot, "wrong_kind"),
        invalid("click token at the open route", "open", ct, "wrong_kind"),
        invalid("expires exactly now", "click", late["token"], "expired"),
        invalid("expired a second ago", "click", gone["token"], "expired"),
        invalid("longer than 4096 characters", "open", token_for("k1", "A" * 4100),
                "too_long"),
    ]  # fmt: skip


def vectors() -> dict[str, Any]:
    good = [
        valid("open", "k1", "open", "spring", "user-42"),
        valid("click", "k1", "click", "spring", "user-42",
              "https://shop.example/sale?utm=mail&x=1"),
        valid("open signed with the second key", "k2", "open", "spring", "user-42"),
        valid("open expiring in 90 days", "k1", "open", "spring", "user-42",
              expires=NOW + 90 * DAY),
        valid("click expiring in a second", "k1", "click", "spring", "user-42",
              "https://shop.example/", NOW + 1),
        valid("non-ASCII text as raw UTF-8", "k1", "click", "été-2026", "Zoë 🙂 用户",
              "https://example.com/caf%C3%A9?q=%C3%BC"),
        valid("quotes, backslash, slash, controls", "k1", "open", 'say "hi" \\ a/b',
              "tab\there\u0001\u001f\u007f"),
        valid("open with the longest fields", "k1", "open", "c" * 256, "r" * 256),
    ]  # fmt: skip
    return {
        "about": "Link token test vectors; see docs/TOKENS.md. Regenerate with "
        "python tests/data/make_token_vectors.py",
        "public_url": PUBLIC_URL,
        "now": NOW,
        "keys": KEYS,
        "valid": good,
        "invalid": invalid_vectors(good[0], good[1]),
    }


def render() -> str:
    return json.dumps(vectors(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {PATH}")
