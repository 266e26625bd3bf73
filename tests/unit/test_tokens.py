from __future__ import annotations

import base64
import hmac

import orjson
import pytest

from trackbuf import links, tokens
from trackbuf.tokens import InvalidToken, Keyring, KeyringError, LinkError, LinkPayload

OLD = "old:0123456789abcdef-old-secret-0123456789"
NEW = "new:fedcba9876543210-new-secret-9876543210"


def click(url: str = "https://example.com/landing?x=1") -> LinkPayload:
    return LinkPayload("click", "camp", "rcpt-1", url)


def test_round_trip() -> None:
    keys = Keyring.parse(OLD)
    for payload in (LinkPayload("open", "camp", "rcpt-1"), click()):
        token = tokens.sign(keys, payload)
        assert tokens.verify(keys, token, payload.kind) == payload


def test_tampering_with_any_character_is_rejected() -> None:
    keys = Keyring.parse(OLD)
    token = tokens.sign(keys, click())
    for i, ch in enumerate(token):
        for replacement in {"A", "b", "_", "-", "0"} - {ch}:
            forged = token[:i] + replacement + token[i + 1 :]
            with pytest.raises(InvalidToken):
                tokens.verify(keys, forged, "click")


def test_unknown_kid_is_rejected() -> None:
    token = tokens.sign(Keyring.parse(OLD), click())
    with pytest.raises(InvalidToken) as info:
        tokens.verify(Keyring.parse(NEW), token, "click")
    assert info.value.reason == "unknown_kid"


def test_same_kid_other_secret_is_a_bad_signature() -> None:
    token = tokens.sign(Keyring.parse("k1:secret-number-one-xxxxxxxxxxxxxxxxxxxx"), click())
    with pytest.raises(InvalidToken) as info:
        tokens.verify(Keyring.parse("k1:secret-number-two-xxxxxxxxxxxxxxxxxxxx"), token, "click")
    assert info.value.reason == "bad_signature"


def test_rotation_new_key_signs_old_key_still_verifies() -> None:
    old_token = tokens.sign(Keyring.parse(OLD), click())
    rotated = Keyring.parse(f"{NEW},{OLD}")
    assert tokens.verify(rotated, old_token, "click") == click()
    new_token = tokens.sign(rotated, click())
    assert new_token.startswith("new.")
    assert tokens.verify(Keyring.parse(NEW), new_token, "click") == click()


def test_open_token_is_not_a_click() -> None:
    keys = Keyring.parse(OLD)
    token = tokens.sign(keys, LinkPayload("open", "camp", "r"))
    with pytest.raises(InvalidToken) as info:
        tokens.verify(keys, token, "click")
    assert info.value.reason == "wrong_kind"


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "//evil.example/",
        "/relative",
        "ftp://files.example/",
        "https://ok.example/\r\nSet-Cookie: x=1",
        "https://ok.example/a b",
        "https://" + "a" * 3000 + ".example/",
    ],
)
def test_only_absolute_http_targets_can_be_signed(url: str) -> None:
    with pytest.raises(LinkError):
        tokens.sign(Keyring.parse(OLD), click(url))


def signed_by_hand(keys: Keyring, fields: list[object]) -> str:
    """A correctly signed token that sign() would have refused to make: what a leaked
    key, or a signer from an older version with looser checks, could produce."""
    body = tokens._b64encode(orjson.dumps(fields))
    signed = f"{keys.signing_kid}.{body}"
    return f"{signed}.{tokens._b64encode(tokens._tag(keys.macs[keys.signing_kid], signed))}"


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "//evil.example/",
        "/relative",
        "http:\\\\evil.example",
        "data:text/html,x",
        "https://ok.example/\r\nLocation: https://evil.example/",
        "https:///no-host",
    ],
)
def test_verify_refuses_a_validly_signed_unsafe_target(url: str) -> None:
    keys = Keyring.parse(OLD)
    token = signed_by_hand(keys, [tokens.FORMAT, "c", "camp", "r", url])
    with pytest.raises(InvalidToken) as info:
        tokens.verify(keys, token, "click")
    assert info.value.reason == "bad_url"  # the signature was fine: the target is not


@pytest.mark.parametrize("junk", ["", "a.b", "a.b.c.d", "old.!!!.x", "x" * 5000])
def test_garbage_is_rejected_not_crashing(junk: str) -> None:
    with pytest.raises(InvalidToken):
        tokens.verify(Keyring.parse(OLD), junk, "open")


LONG = "0123456789abcdef0123456789abcdef"  # 32 bytes: the shortest secret accepted


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no signing keys"),
        ("k1", "expected kid:secret"),
        (f"k1:{LONG[:31]}", "key 'k1': the secret is 31 bytes, at least 32"),
        (f"bad kid!:{LONG}", "key #1: the kid before ':' must be"),
        (f"k1:{LONG},k1:{LONG}x", "listed twice"),
    ],
)
def test_keyring_errors_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(KeyringError, match=message):
        Keyring.parse(spec)


def test_a_32_byte_secret_is_enough_and_bytes_are_what_count() -> None:
    assert Keyring.parse(f"k1:{LONG}").signing_kid == "k1"
    with pytest.raises(KeyringError, match="18 bytes"):
        Keyring.parse("k1:" + "é" * 9)  # 9 characters, 18 bytes of UTF-8


@pytest.mark.parametrize(
    "spec",
    [
        "sEcReT-only-no-kid-0123456789abcdef",  # the kid forgotten: the whole entry is secret
        "k1:sEcReT-too-short",
        "k1 sEcReT-typed-with-a-space-0123456789:x",
    ],
)
def test_keyring_errors_never_show_the_secret(spec: str) -> None:
    with pytest.raises(KeyringError) as info:
        Keyring.parse(spec)
    assert "sEcReT" not in str(info.value)


def test_a_keyring_shows_its_kids_not_its_secrets() -> None:
    keys = Keyring.parse(f"{NEW},{OLD}")
    assert "secret" not in repr(keys) and "new" in repr(keys)


def test_links_are_full_urls_under_the_public_base() -> None:
    keys = Keyring.parse(OLD)
    pixel = links.open_url("https://t.example.com/", keys, "c", "r")
    assert pixel.startswith("https://t.example.com/o/old.") and pixel.endswith(".gif")
    token = pixel.removeprefix("https://t.example.com/o/").removesuffix(".gif")
    assert tokens.verify(keys, token, "open") == LinkPayload("open", "c", "r")
    target = links.click_url("https://t.example.com", keys, "c", "r", "https://x.example/")
    assert target.startswith("https://t.example.com/c/old.")


def test_new_key_is_usable() -> None:
    spec = tokens.new_key("k9")
    assert Keyring.parse(spec).signing_kid == "k9"


def test_non_ascii_targets_are_percent_encoded_once() -> None:
    keys = Keyring.parse(OLD)
    token = tokens.sign(keys, click("https://example.com/café?q=ü"))
    payload = tokens.verify(keys, token, "click")
    assert payload.url == "https://example.com/caf%C3%A9?q=%C3%BC"
    assert tokens.ascii_url("https://example.com/a%20b") == "https://example.com/a%20b"


def test_a_token_ingest_would_refuse_is_never_signed() -> None:
    keys = Keyring.parse(OLD)
    url = "https://example.com/" + "a" * 2000
    with pytest.raises(LinkError, match="ingest accepts"):
        tokens.sign(keys, LinkPayload("click", "é" * 256, "ü" * 256, url))


@pytest.mark.parametrize("key_length", [1, 16, 63, 64, 65, 200])
def test_hmac_matches_the_standard_library(key_length: int) -> None:
    key = bytes(i * 37 % 256 for i in range(key_length))
    mac = tokens.HmacSha256(key)
    for message in (b"", b"k1.payload", b"x" * 1000):
        assert mac.digest(message) == hmac.digest(key, message, "sha256")


def test_tokens_signed_before_expiry_existed_still_verify() -> None:
    # Made by the previous release: links in emails already sent must keep working.
    keys = Keyring.parse(OLD)
    made_before = {
        "click": "old.WzEsImMiLCJjYW1wIiwicmNwdC0xIiwiaHR0cHM6Ly9leGFtcGxlLmNvbS9sYW5kaW5n"
        "P3g9MSJd.w84g2KBCwC5vSJUhABEYyw",
        "open": "old.WzEsIm8iLCJjYW1wIiwicmNwdC0xIl0.B1ynFYV24VZ_ia6wmEy2Ng",
    }
    assert tokens.verify(keys, made_before["click"], "click") == click()
    assert tokens.verify(keys, made_before["open"], "open") == LinkPayload("open", "camp", "rcpt-1")


def mac_by_hand(keys: Keyring, body: str) -> str:
    """A token whose MAC is right for any payload text: what a sender's own encoder
    would make if it spelled the payload differently from the spec."""
    signed = f"{keys.signing_kid}.{body}"
    return f"{signed}.{tokens._b64encode(tokens._tag(keys.macs[keys.signing_kid], signed))}"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


CANONICAL_JSON = b'[1,"o","camp","r/A"]'
CANONICAL = b64(CANONICAL_JSON).rstrip("=")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (CANONICAL, None),  # the one spelling that verifies
        (b64(CANONICAL_JSON), "non_canonical"),  # with '=' padding
        (CANONICAL[:-1] + chr(ord(CANONICAL[-1]) + 1), "non_canonical"),  # other spare bits
        (b64(b'[1,"o","camp","r/A"]>>?').rstrip("="), "malformed"),  # trailing garbage
        (b64(b'[1, "o", "camp", "r/A"]').rstrip("="), "non_canonical"),  # spaces
        (b64(b'[1,"o","camp","r\\/A"]').rstrip("="), "non_canonical"),  # escaped '/'
        (b64(b'[1,"o","camp","r/\\u0041"]').rstrip("="), "non_canonical"),  # escaped 'A'
        (b64(b'[1,"\\u006f","camp","r/A"]').rstrip("="), "non_canonical"),
        (b64(b'[1.0,"o","camp","r/A"]').rstrip("="), "malformed"),  # not an integer
        (b64(b'[true,"o","camp","r/A"]').rstrip("="), "malformed"),  # == 1 in Python
        (b64(b'[1,"o","camp","r/A",null]').rstrip("="), "malformed"),
        (b64(b'[1,"o","camp","r/A","https://x.example/"]').rstrip("="), "malformed"),
    ],
)
def test_only_the_canonical_spelling_of_a_payload_verifies(body: str, reason: str | None) -> None:
    keys = Keyring.parse(OLD)
    token = mac_by_hand(keys, body)
    if reason is None:
        assert token == tokens.sign(keys, LinkPayload("open", "camp", "r/A"))
        assert tokens.verify(keys, token, "open") == LinkPayload("open", "camp", "r/A")
        return
    with pytest.raises(InvalidToken) as info:
        tokens.verify(keys, token, "open")
    assert info.value.reason == reason


def test_the_standard_base64_alphabet_is_another_spelling() -> None:
    keys = Keyring.parse(OLD)
    token = tokens.sign(keys, LinkPayload("open", "camp", "??>>??>>"))  # '-' and '_' inside
    body = token.split(".")[1]
    assert "-" in body or "_" in body
    standard = body.replace("-", "+").replace("_", "/")
    with pytest.raises(InvalidToken) as info:
        tokens.verify(keys, mac_by_hand(keys, standard), "open")
    assert info.value.reason == "non_canonical"


@pytest.mark.parametrize("suffix", ["A", "AA", "=", "==", ".x"])
def test_a_cut_or_extended_tag_is_malformed(suffix: str) -> None:
    keys = Keyring.parse(OLD)
    token = tokens.sign(keys, click())
    for bad in (token + suffix, token[: -len(suffix)]):
        with pytest.raises(InvalidToken) as info:
            tokens.verify(keys, bad, "click")
        assert info.value.reason == "malformed"


@pytest.mark.parametrize("junk", ["old.é.x", "old.\ud800.x", "\x00.a.b", "k\u2028.a.bbbbbb"])
def test_non_ascii_and_unencodable_tokens_are_malformed(junk: str) -> None:
    with pytest.raises(InvalidToken) as info:
        tokens.verify(Keyring.parse(OLD), junk, "open")
    assert info.value.reason == "malformed"


def test_an_expiring_link_verifies_until_its_expiry_then_is_expired() -> None:
    keys = Keyring.parse(OLD)
    payload = LinkPayload("click", "camp", "r", "https://x.example/", expires=1_800_000_000)
    token = tokens.sign(keys, payload)
    assert tokens.verify(keys, token, "click", now=1_799_999_999.9) == payload
    for now in (1_800_000_000, 1_900_000_000):
        with pytest.raises(InvalidToken) as info:
            tokens.verify(keys, token, "click", now=now)
        assert info.value.reason == "expired"
    opened = tokens.sign(keys, LinkPayload("open", "camp", "r", expires=1_800_000_000))
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify(keys, opened, "open", now=1_800_000_000)
    assert tokens.verify(keys, opened, "open", now=0).expires == 1_800_000_000


def test_the_expiry_is_signed() -> None:
    keys = Keyring.parse(OLD)
    short = tokens.sign(keys, LinkPayload("open", "c", "r", expires=1_800_000_000))
    longer = tokens.sign(keys, LinkPayload("open", "c", "r", expires=1_900_000_000))
    spliced = ".".join([*longer.split(".")[:2], short.split(".")[2]])
    with pytest.raises(InvalidToken, match="bad_signature"):
        tokens.verify(keys, spliced, "open", now=1_850_000_000)


@pytest.mark.parametrize("expires", [0, -5, 2**53, True, 1.5])
def test_an_expiry_must_be_a_positive_whole_second(expires: object) -> None:
    with pytest.raises(LinkError, match="bad_expires"):
        tokens.sign(Keyring.parse(OLD), LinkPayload("open", "c", "r", expires=expires))  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "\ud800", "a" * 257])
def test_campaigns_that_json_cannot_carry_are_not_signed(text: str) -> None:
    with pytest.raises(LinkError, match="bad_campaign"):
        tokens.sign(Keyring.parse(OLD), LinkPayload("open", text, "r"))


def test_a_backslash_in_a_target_is_refused() -> None:
    # Browsers read https://evil.example\@shop.example/ as a path on evil.example.
    url = "https://evil.example\\@shop.example/"
    assert not tokens.is_safe_target(url)
    with pytest.raises(LinkError):
        tokens.sign(Keyring.parse(OLD), click(url))
    token = signed_by_hand(Keyring.parse(OLD), [tokens.FORMAT, "c", "camp", "r", url])
    with pytest.raises(InvalidToken, match="bad_url"):
        tokens.verify(Keyring.parse(OLD), token, "click")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90d", 90 * 86400), ("12h", 43200), ("30m", 1800), ("45s", 45), ("2w", 1209600)],
)
def test_durations(text: str, seconds: int) -> None:
    assert links.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0d", "-1d", "90", "d", "1.5h", "90 days", "1y"])
def test_bad_durations_say_what_a_duration_is(text: str) -> None:
    with pytest.raises(LinkError, match="positive number and a unit"):
        links.parse_duration(text)


def test_a_control_character_is_refused_in_a_target_with_non_ascii_too() -> None:
    # Only non-ASCII characters are percent-encoded: an 'é' elsewhere in the URL must
    # not turn a CR LF or a space into %0D%0A or %20 and let it through.
    keys = Keyring.parse(OLD)
    for url in ("https://é.example/\r\nSet-Cookie: x=1", "https://shop.example/é b"):
        assert tokens.ascii_url(url) == url.replace("é", "%C3%A9")
        with pytest.raises(LinkError, match="bad_url"):
            tokens.sign(keys, click(url))
        token = signed_by_hand(keys, [tokens.FORMAT, "c", "camp", "r", url])
        with pytest.raises(InvalidToken, match="bad_url"):
            tokens.verify(keys, token, "click")


def test_a_target_with_a_lone_surrogate_is_a_link_error() -> None:
    with pytest.raises(LinkError, match="bad_url"):
        tokens.sign(Keyring.parse(OLD), click("https://shop.example/\ud800"))


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("HTTPS://SHOP.EXAMPLE/", True),  # the scheme and host in any case
        ("https://user:pw@shop.example/", True),  # user info, up to the last '@'
        ("https://a@b@shop.example/", True),
        ("https://shop.example:8443/x", True),
        ("https://shop.example:/", True),  # an empty port: the default
        ("https://shop.example:65535/", True),
        ("https://[::1]:8080/x", True),
        ("https://[::ffff:192.0.2.1]/", True),
        ("https://shop.example:65536/", False),
        ("https://shop.example:000080/", False),  # more than five digits
        ("https://shop.example:http/", False),
        ("https://a:b:c/", False),
        ("https://user@/", False),  # an empty host
        ("https://:443/", False),
        ("https://[not-an-ip]/", False),  # accepted by Python before 3.11.4
        ("https://[v1.fe]/", False),  # an IPvFuture literal
        ("https://[fe80::1%25eth0]/", False),  # a zone identifier
        ("https://x[::1]/", False),
        ("https://a[b@shop.example/", False),
        ("https:shop.example", False),  # no "//": no host at all
    ],
)
def test_what_a_url_with_a_host_admits(url: str, safe: bool) -> None:
    assert tokens.is_safe_target(url) is safe


def test_any_integer_past_2_53_is_malformed_whatever_its_size() -> None:
    # orjson reads integers up to 2**64 - 1 and fails past them: the reason must not
    # depend on that, so every integer a JavaScript number cannot hold is malformed.
    keys = Keyring.parse(OLD)
    for number in (2**53, 2**64 - 1, 2**64, 10**30, -(2**53)):
        body = tokens._b64encode(f'[1,"o","camp","r",{number}]'.encode())
        with pytest.raises(InvalidToken) as info:
            tokens.verify(keys, mac_by_hand(keys, body), "open")
        assert info.value.reason == "malformed", number
    for number, reason in ((2**53 - 1, None), (0, "bad_expires"), (-(2**53 - 1), "bad_expires")):
        token = signed_by_hand(keys, [tokens.FORMAT, "o", "camp", "r", number])
        if reason is None:
            assert tokens.verify(keys, token, "open", now=0).expires == number
            continue
        with pytest.raises(InvalidToken) as info:
            tokens.verify(keys, token, "open")
        assert info.value.reason == reason


@pytest.mark.parametrize("at", [0, 1, 2, 3, 4, 9, 10, 11, 12, 13])
@pytest.mark.parametrize("stray", ["=", "==", "!", " ", "%", "*"])
def test_a_stray_character_in_the_payload_is_malformed_wherever_it_stands(
    at: int, stray: str
) -> None:
    # binascii's lenient decoder skipped such characters and then refused or accepted
    # the rest depending on where they stood and how many there were.
    keys = Keyring.parse(OLD)
    body = CANONICAL[:at] + stray + CANONICAL[at:]
    with pytest.raises(InvalidToken) as info:
        tokens.verify(keys, mac_by_hand(keys, body), "open")
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("padding", ["=", "==", "===", "===="])
def test_any_trailing_padding_is_non_canonical(padding: str) -> None:
    keys = Keyring.parse(OLD)
    with pytest.raises(InvalidToken) as info:
        tokens.verify(keys, mac_by_hand(keys, CANONICAL + padding), "open")
    assert info.value.reason == "non_canonical"


def test_a_payload_length_no_base64_has_is_malformed() -> None:
    keys = Keyring.parse(OLD)
    body = CANONICAL[: len(CANONICAL) - (len(CANONICAL) - 1) % 4]
    assert len(body) % 4 == 1
    with pytest.raises(InvalidToken) as info:
        tokens.verify(keys, mac_by_hand(keys, body), "open")
    assert info.value.reason == "malformed"
