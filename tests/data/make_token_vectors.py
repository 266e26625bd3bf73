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
MAX_TOKEN = 4096
MAX_URL = 2048


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


def signed_json(kind_code: str, tail: str) -> str:
    """A k1 token for the JSON text ``[1,"<kind_code>",<tail>]``, spelled exactly so."""
    return token_for("k1", from_json(f'[1,"{kind_code}",{tail}]'))


def url_json(url: str) -> str:
    """A k1 token for a click to ``url`` (raw in the JSON), campaign "s", recipient "r"."""
    return token_for("k1", from_json(canonical_json([1, "c", "s", "r", url])))


def longest_click(extra: int) -> dict[str, Any]:
    """A click whose token is 4096 + ``extra`` characters long: its URL has the longest
    allowed 2048, its campaign 256 three-byte characters, its recipient what is left."""
    url = "https://shop.example/" + "p" * (MAX_URL - len("https://shop.example/"))
    campaign = "\u20ac" * 256  # the euro sign: three bytes in UTF-8
    for size in range(256):
        recipient = "r" * size
        v = valid("-", "k1", "click", campaign, recipient, url)
        if len(v["token"]) == MAX_TOKEN + extra:
            return valid(f"click of exactly {MAX_TOKEN + extra} characters, its URL of "
                         f"{MAX_URL}", "k1", "click", campaign, recipient, url)  # fmt: skip
    raise AssertionError(f"no recipient makes a token of {MAX_TOKEN + extra} characters")


def invalid_vectors(open_: dict[str, Any], click: dict[str, Any]) -> list[dict[str, str]]:
    ot, ct = open_["token"], click["token"]
    kid, payload, good_tag = ot.split(".")
    flipped = ("B" if good_tag[0] == "A" else "A") + good_tag[1:]
    padded = base64.urlsafe_b64encode(open_["json"].encode()).decode()
    assert padded.endswith("="), "pick an open vector whose payload needs padding"
    last = payload[-1]
    spare = payload[:-1] + chr(ord(last) + 1)  # same bytes: only spare low bits differ
    assert base64.urlsafe_b64decode(spare + "==") == open_["json"].encode()
    spare_tag = good_tag[:-1] + chr(ord(good_tag[-1]) + 1)
    assert base64.urlsafe_b64decode(spare_tag + "==") == base64.urlsafe_b64decode(good_tag + "==")
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
        # The length is counted first, in characters, whatever they are.
        invalid("4097 non-ASCII characters", "open", "\u00e9" * 4097, "too_long"),
        invalid("4096 non-ASCII characters", "open", "\u00e9" * 4096, "malformed"),
        invalid("a valid click one character over the limit", "click",
                longest_click(1)["token"], "too_long"),
        invalid("a non-ASCII character in the payload", "open",
                f"{kid}.{payload[:5]}\u00e9{payload[5:]}.{good_tag}", "malformed"),
        # The kid is looked up as it is: any text that is not a configured kid.
        invalid("empty kid", "open", token_for("", payload), "unknown_kid"),
        invalid("kid in another case", "open", token_for("K1", payload), "unknown_kid"),
        # The tag is compared as text: another spelling of the same 16 bytes is wrong.
        invalid("tag with other spare bits in its last character", "open",
                f"{kid}.{payload}.{spare_tag}", "bad_signature"),
        # Base64: '+', '/' and trailing '=' are read, then refused as another spelling;
        # anything else that is not base64url makes the payload unreadable.
        invalid("payload with more '=' padding than base64 needs", "open",
                token_for("k1", padded + "=="), "non_canonical"),
        invalid("payload with '=' inside it", "open",
                token_for("k1", f"{payload[:4]}=={payload[4:]}"), "malformed"),
        invalid("payload with a character of neither base64 alphabet", "open",
                token_for("k1", f"{payload[:4]}*{payload[4:]}"), "malformed"),
        invalid("payload whose length is 1 more than a multiple of 4", "open",
                token_for("k1", payload[: len(payload) - (len(payload) - 1) % 4]),
                "malformed"),
        # Text: UTF-8 and JSON as RFC 8259 has them, with no lone surrogate.
        invalid("JSON string with an escaped lone surrogate", "open",
                signed_json("o", '"\\ud800","r"'), "malformed"),
        invalid("a lone surrogate as UTF-8 bytes (ED A0 80)", "open",
                token_for("k1", b64url(b'[1,"o","\xed\xa0\x80","r"]')), "malformed"),
        invalid("bytes that are not UTF-8", "open",
                token_for("k1", b64url(b'[1,"o","\xff","r"]')), "malformed"),
        invalid("a byte order mark before the JSON", "open",
                token_for("k1", b64url(b'\xef\xbb\xbf[1,"o","s","r"]')), "malformed"),
        invalid("a raw control character in a JSON string", "open",
                signed_json("o", '"s\u0001","r"'), "malformed"),
        invalid("JSON with an escaped surrogate pair", "open",
                signed_json("o", '"\\ud83d\\ude42","r"'), "non_canonical"),
        invalid("JSON with upper-case hex in \\u001F", "open",
                signed_json("o", '"s\\u001F","r"'), "non_canonical"),
        invalid("JSON with DEL escaped", "open",
                signed_json("o", '"s\\u007f","r"'), "non_canonical"),
        # Integers: only -?(0|[1-9][0-9]*) within +-(2^53 - 1).
        invalid("expiry with a fraction", "open", signed_json("o", '"s","r",1767312000.0'),
                "malformed"),
        invalid("expiry with an exponent", "open", signed_json("o", '"s","r",2e9'),
                "malformed"),
        invalid("expiry with a leading zero", "open", signed_json("o", '"s","r",01767312000'),
                "malformed"),
        invalid("expiry with a '+' sign", "open", signed_json("o", '"s","r",+1767312000'),
                "malformed"),
        invalid("expiry true", "open", signed_json("o", '"s","r",true'), "malformed"),
        invalid("expiry 2^53", "open", signed_json("o", '"s","r",9007199254740992'),
                "malformed"),
        invalid("expiry 2^64", "open", signed_json("o", '"s","r",18446744073709551616'),
                "malformed"),
        invalid("expiry -0", "open", signed_json("o", '"s","r",-0'), "non_canonical"),
        invalid("expiry -1", "open", signed_json("o", '"s","r",-1'), "bad_expires"),
        invalid("format 01", "open", token_for("k1", from_json('[01,"o","s","r"]')),
                "malformed"),
        # Which reason wins: the first failing step of the verification algorithm.
        invalid("JSON with spaces and an unknown kind: the spelling is checked first",
                "open", token_for("k1", from_json('[1, "x", "s", "r"]')), "non_canonical"),
        invalid("a number for the recipient and an empty campaign: structure first",
                "open", signed_json("o", '"",5'), "malformed"),
        invalid("kind in upper case", "open", signed_json("O", '"s","r"'), "malformed"),
        invalid("open with an expiry and one element more", "open",
                signed_json("o", '"s","r",1767312000,1'), "malformed"),
        invalid("click with an expiry before its URL", "click",
                signed_json("c", '"s","r",1767312000,"https://shop.example/"'), "malformed"),
        invalid("empty campaign and a javascript: target: campaign first", "click",
                signed_json("c", '"","r","javascript:alert(1)",0'), "bad_campaign"),
        invalid("empty recipient", "open", signed_json("o", '"s",""'), "bad_recipient"),
        invalid("recipient of 257 characters", "open",
                signed_json("o", canonical_json(["s", "r" * 257])[1:-1]), "bad_recipient"),
        invalid("campaign of 257 four-byte characters", "open",
                signed_json("o", canonical_json(["\U0001f642" * 257, "r"])[1:-1]),
                "bad_campaign"),
        invalid("a click with a bad target at the open route: bad_url first", "open",
                url_json("javascript:alert(1)"), "bad_url"),
        invalid("an expired click at the open route: wrong_kind first", "open",
                gone["token"], "wrong_kind"),
        # The target: what "an absolute http(s) URL with a host" admits.
        invalid("target scheme ftp", "click", url_json("ftp://shop.example/"), "bad_url"),
        invalid("target with no '//' after the scheme", "click",
                url_json("https:shop.example/"), "bad_url"),
        invalid("target with an empty host", "click", url_json("https://:443/"), "bad_url"),
        invalid("target with user info and an empty host", "click",
                url_json("https://user@/"), "bad_url"),
        invalid("target with a port that is not digits", "click",
                url_json("https://shop.example:http/"), "bad_url"),
        invalid("target with port 65536", "click", url_json("https://shop.example:65536/"),
                "bad_url"),
        invalid("target with a port of six digits", "click",
                url_json("https://shop.example:000443/"), "bad_url"),
        invalid("target with a bracketed host that is not IPv6", "click",
                url_json("https://[shop.example]/"), "bad_url"),
        invalid("target with an IPv6 zone identifier", "click",
                url_json("https://[fe80::1%25eth0]/"), "bad_url"),
        invalid("target with a '[' in its user info", "click",
                url_json("https://a[@shop.example/"), "bad_url"),
        invalid("target with a space", "click", url_json("https://shop.example/a b"),
                "bad_url"),
        invalid("target with DEL", "click", url_json("https://shop.example/\x7f"), "bad_url"),
        invalid("target with CR LF and a non-ASCII character", "click",
                url_json("https://shop.example/\u00e9\r\nSet-Cookie: x=1"), "bad_url"),
        invalid("target of 2049 characters", "click",
                url_json("https://shop.example/" + "p" * (MAX_URL + 1 - 21)), "bad_url"),
        invalid("target over 2048 characters once percent-encoded", "click",
                url_json("https://shop.example/" + "\u00e9" * 340), "bad_url"),
    ]  # fmt: skip


def iri_targets() -> list[dict[str, str]]:
    """Clicks signed with a non-ASCII target, as a sender may: they verify, and the
    target is the URL with each non-ASCII character percent-encoded (UTF-8, upper-case
    hex), everything else as signed."""
    cases = [
        ("non-ASCII path and query", "https://shop.example/caf\u00e9?q=\u00fc",
         "https://shop.example/caf%C3%A9?q=%C3%BC"),
        ("escapes already there are kept as written", "https://shop.example/%c3%a9/\u00fc",
         "https://shop.example/%c3%a9/%C3%BC"),
        ("a four-byte character", "https://shop.example/\U0001f642",
         "https://shop.example/%F0%9F%99%82"),
        ("a non-ASCII host", "https://b\u00fccher.example/",
         "https://b%C3%BCcher.example/"),
    ]  # fmt: skip
    return [
        {"name": name, "kind": "click", "json": canonical_json([1, "c", "s", "r", url]),
         "token": url_json(url), "target": target}
        for name, url, target in cases
    ]  # fmt: skip


# TRACKBUF_REDIRECT_HOSTS: a setting, targets it lets a click go to and targets it
# refuses (host_not_allowed), and settings ingest refuses to start with.
REDIRECT_HOSTS = {
    "setting": " Shop.Example ,*.example.org,, 192.0.2.1",
    "allowed": [
        "https://shop.example/", "HTTPS://SHOP.EXAMPLE:8443/x", "https://user@shop.example/",
        "https://a.example.org/", "https://a.b.example.org/", "http://192.0.2.1/",
    ],
    "refused": [
        "https://example.org/", "https://shop.example.net/", "https://myshop.example/",
        "https://shop.example./", "https://[::1]/", "https://sh%6Fp.example/",
        "https://sh_op.example/", "https://shop.example@evil.example/",
        "https://b%C3%BCcher.example/", "https://192.0.2.10/",
    ],
    "bad_settings": [
        "https://shop.example", "shop.example:443", "shop.example/path", "*", "*.",
        "*example.org", "a.*.example.org", "sh_op.example", "[::1]", "shop..example",
        ".example.org", "shop.example.",
    ],
}  # fmt: skip

# kid:secret entries that every signer and verifier refuses, and the shortest accepted.
KEY_ENTRIES = {
    "accepted": ["k3:" + "s" * 32, "k3:" + "\u00e9" * 16, "k-_3:" + "s" * 32,
                 "k3:a:b:" + "s" * 28],
    "refused": ["k3:" + "s" * 31, "k3:" + "\u00e9" * 15 + "s", "k3", ":" + "s" * 32,
                "k.3:" + "s" * 32, "k3456789012345678:" + "s" * 32],
}  # fmt: skip


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
        valid("open with 256 four-byte characters in each field", "k1", "open",
              "\U0001f642" * 256, "\U0001f642" * 256),
        valid("open expiring at 2^53 - 1", "k1", "open", "spring", "user-42",
              expires=2**53 - 1),
        valid("target with upper-case scheme and host, user info and a port", "k1",
              "click", "spring", "user-42", "HTTPS://user:pw@Shop.Example:8443/a?b#c"),
        valid("target with an IPv6 host and a port", "k1", "click", "spring", "user-42",
              "http://[2001:db8::1]:8080/"),
        valid("target with an empty port and lower-case escapes", "k1", "click", "spring",
              "user-42", "https://shop.example:/caf%c3%a9"),
        longest_click(0),
    ]  # fmt: skip
    return {
        "about": "Link token test vectors; see docs/TOKENS.md. Regenerate with "
        "python tests/data/make_token_vectors.py",
        "public_url": PUBLIC_URL,
        "now": NOW,
        "keys": KEYS,
        "valid": good,
        "invalid": invalid_vectors(good[0], good[1]),
        "iri_targets": iri_targets(),
        "redirect_hosts": REDIRECT_HOSTS,
        "key_entries": KEY_ENTRIES,
    }


def render() -> str:
    return json.dumps(vectors(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {PATH}")
