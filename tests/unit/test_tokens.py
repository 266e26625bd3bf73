from __future__ import annotations

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
