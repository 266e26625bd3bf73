"""Properties of link tokens and the click route, over generated inputs (hypothesis).

- No mutation of a valid token verifies: a changed, cut, extended or re-spelled token
  is refused, even when the re-spelling carries a correct MAC.
- The click route's decision (ingest.decide.click_target) never yields a redirect target
  other than one that was signed, whatever it is given, signed or not.
- A target that gets through, and the Location header made from it, never holds a
  control character, whitespace, a backslash or a non-ASCII character.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import urlsplit

import orjson
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ingest.decide import click_target, redirect
from trackbuf import tokens
from trackbuf.redirect_hosts import RedirectHosts
from trackbuf.tokens import InvalidToken, Keyring, LinkError, LinkPayload

KEYS = Keyring.parse(
    "k1:property-test-key-one-0123456789abcdef,k2:property-test-key-two-0123456789abcdef"
)
ANY_HOST = RedirectHosts()
SOME_HOSTS = RedirectHosts.parse("shop.example.com,*.example.org")
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
NEVER = 0  # verify "now" = the epoch: no generated expiry (>= 1) has passed

text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
hosts = st.lists(labels, min_size=1, max_size=3).map(".".join) | st.sampled_from(
    ["shop.example.com", "a.example.org", "example.org", "evil.example"]
)
paths = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"),
                max_size=30)  # fmt: skip
safe_urls = st.builds(lambda s, h, p: f"{s}://{h}/{p}", st.sampled_from(["http", "https"]),
                      hosts, paths)  # fmt: skip
# Targets a careless or hostile signer could put in a token: odd schemes, controls,
# whitespace, backslashes, '@' and '#' tricks, non-ASCII.
tricky = st.text(
    st.sampled_from([*"aZ09./:@?#%[]-_~\\", " ", "\t", "\r", "\n", "\x00", "\x1f", "\x7f"]),
    max_size=20,
)
unicode_tails = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
SCHEMES = ["https://", "http://", "HTTPS://", "javascript:", "//", "", "https:", "http:\\\\"]
schemes = st.sampled_from([*SCHEMES, "https://shop.example.com", "https://a.example.org@"])
any_urls = (
    safe_urls
    | st.builds(str.__add__, schemes, tricky | unicode_tails)
    | st.builds(lambda u, t, i: u[:i] + t + u[i:], safe_urls, tricky, st.integers(8, 40))
)  # fmt: skip
expiries = st.none() | st.integers(1, 2**53 - 1)


@st.composite
def payloads(draw: st.DrawFn) -> LinkPayload:
    kind = draw(st.sampled_from(["open", "click"]))
    url = draw(safe_urls) if kind == "click" else None
    return LinkPayload(kind, draw(text), draw(text), url, draw(expiries))


def fields_of(payload: LinkPayload) -> list[object]:
    fields: list[object] = [1, "o" if payload.kind == "open" else "c"]
    fields += [payload.campaign, payload.recipient]
    if payload.url is not None:
        fields.append(payload.url)
    if payload.expires is not None:
        fields.append(payload.expires)
    return fields


def mac_by_hand(body: str, kid: str = "k1") -> str:
    """A token with a correct MAC for any payload text, as only a key holder can make."""
    signed = f"{kid}.{body}"
    return f"{signed}.{tokens._b64encode(tokens._tag(KEYS.macs[kid], signed))}"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@st.composite
def mutations(draw: st.DrawFn, token: str) -> str:
    how = draw(st.sampled_from(["replace", "bitflip", "truncate", "extend", "insert", "delete"]))
    i = draw(st.integers(0, len(token) - 1))
    if how == "replace":
        return token[:i] + draw(st.characters()) + token[i + 1 :]
    if how == "bitflip":
        return token[:i] + chr(ord(token[i]) ^ (1 << draw(st.integers(0, 7)))) + token[i + 1 :]
    if how == "truncate":
        return token[:i]
    if how == "delete":
        return token[:i] + token[i + 1 :]
    extra = draw(st.text(min_size=1, max_size=8))
    return token + extra if how == "extend" else token[:i] + extra + token[i:]


@settings(max_examples=300)
@given(payload=payloads(), data=st.data())
def test_no_mutation_of_a_valid_token_verifies(payload: LinkPayload, data: st.DataObject) -> None:
    token = tokens.sign(KEYS, payload)
    assert tokens.verify(KEYS, token, payload.kind, now=NEVER) == payload
    mutated = data.draw(mutations(token))
    assume(mutated != token)
    try:
        tokens.verify(KEYS, mutated, payload.kind, now=NEVER)
    except InvalidToken:
        return
    raise AssertionError(f"a mutated token verified: {mutated!r}")


@given(payload=payloads(), data=st.data())
def test_no_other_spelling_of_a_payload_verifies_even_with_a_correct_mac(
    payload: LinkPayload, data: st.DataObject
) -> None:
    fields = fields_of(payload)
    canonical_json = orjson.dumps(fields)
    canonical = b64url(canonical_json)
    how = data.draw(st.sampled_from(["spaces", "ascii_escapes", "padding", "spare_bits",
                                     "standard_alphabet"]))  # fmt: skip
    if how == "spaces":
        body = b64url(json.dumps(fields, ensure_ascii=False).encode())
    elif how == "ascii_escapes":
        body = b64url(json.dumps(fields, separators=(",", ":")).encode())  # \uXXXX
    elif how == "padding":
        body = base64.urlsafe_b64encode(canonical_json).decode()
    elif how == "spare_bits":
        assume(len(canonical_json) % 3)  # else the last character has no spare bits
        alphabet = B64
        spare = (1 << (2 if len(canonical_json) % 3 == 2 else 4)) - 1
        last = alphabet.index(canonical[-1])
        bits = data.draw(st.integers(1, spare))
        body = canonical[:-1] + alphabet[(last & ~spare) | bits]
    else:
        body = canonical.replace("-", "+").replace("_", "/")
    assume(body != canonical)
    for token in (mac_by_hand(body), f"{mac_by_hand(body).rsplit('.', 1)[0]}.{canonical}"):
        try:
            tokens.verify(KEYS, token, payload.kind, now=NEVER)
        except InvalidToken:
            continue
        raise AssertionError(f"a re-spelled token verified: {token!r}")


TOKENISH = st.builds(
    "{}.{}.{}".format,
    st.sampled_from(["k1", "k2", "k3"]),
    st.text(B64 + "=+/", max_size=60),
    st.text(B64, min_size=22, max_size=22),
)


@given(token=st.text(max_size=120) | TOKENISH)
def test_unsigned_input_never_redirects(token: str) -> None:
    for allowed in (ANY_HOST, SOME_HOSTS):
        try:
            click_target(KEYS, allowed, token, now=NEVER)
        except InvalidToken:
            continue
        raise AssertionError(f"an unsigned token redirected: {token!r}")


def assert_clean(target: str) -> None:
    assert target.isascii()
    assert not any(ord(ch) <= 0x20 or ord(ch) == 0x7F or ch == "\\" for ch in target)


@settings(max_examples=300)
@given(url=any_urls, campaign=text, recipient=text, expires=expiries, data=st.data())
def test_a_click_redirects_only_to_the_target_it_was_signed_for(
    url: str, campaign: str, recipient: str, expires: int | None, data: st.DataObject
) -> None:
    # Signed by hand, bypassing sign()'s own checks: what a leaked key or a careless
    # sender could produce. Verification must hold on its own.
    fields: list[object] = [1, "c", campaign, recipient, url]
    if expires is not None:
        fields.append(expires)
    token = mac_by_hand(b64url(orjson.dumps(fields)))
    if data.draw(st.booleans()):
        token = data.draw(mutations(token))
    for allowed in (ANY_HOST, SOME_HOSTS):
        try:
            _, target = click_target(KEYS, allowed, token, now=NEVER)
        except InvalidToken:
            continue
        assert target == tokens.ascii_url(url)  # the signed target, at most %-encoded
        assert_clean(target)
        host = urlsplit(target).hostname or ""
        if allowed is SOME_HOSTS:
            assert host == "shop.example.com" or host.endswith(".example.org")
        location = dict(redirect(target).headers)["Location"]
        assert location == target
        assert_clean(location)


@given(url=any_urls, payload=payloads())
def test_sign_refuses_or_makes_a_token_whose_target_is_clean(
    url: str, payload: LinkPayload
) -> None:
    try:
        token = tokens.sign(KEYS, LinkPayload("click", payload.campaign, payload.recipient, url))
    except LinkError:
        return
    target = tokens.verify(KEYS, token, "click", now=NEVER).url
    assert target is not None and target == tokens.ascii_url(url)
    assert_clean(target)
