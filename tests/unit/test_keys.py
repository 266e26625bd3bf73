from __future__ import annotations

from pathlib import Path

import pytest

from trackbuf.keys import load_keyring
from trackbuf.settings import load
from trackbuf.tokens import Keyring, KeyringError

K1 = "k1:first-secret-0123456789abcdef0123456789"
K2 = "k2:second-secret-0123456789abcdef012345678"


def from_file(path: Path, text: str | bytes) -> Keyring:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return load_keyring(load({"TRACKBUF_SIGNING_KEYS_FILE": str(path)}))


@pytest.mark.parametrize(
    "text",
    [
        f"{K2}\n{K1}\n",
        f"{K2},{K1}",
        f"# rotated 2026-11-24\n\n  {K2}  \n# the old one, until its links are gone\n{K1}\n",
        f"{K2},\n{K1}",
    ],
)
def test_a_keys_file_holds_one_entry_a_line_or_comma_separated(tmp_path: Path, text: str) -> None:
    keyring = from_file(tmp_path / "keys", text)
    assert keyring.signing_kid == "k2" and set(keyring.keys) == {"k1", "k2"}


def test_the_variable_still_works_without_a_file() -> None:
    assert load_keyring(load({"TRACKBUF_SIGNING_KEYS": K1})).signing_kid == "k1"


def test_keys_in_both_places_are_refused(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text(K1)
    settings = load({"TRACKBUF_SIGNING_KEYS": K2, "TRACKBUF_SIGNING_KEYS_FILE": str(tmp_path)})
    with pytest.raises(KeyringError, match="not both"):
        load_keyring(settings)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no kid:secret entries"),
        ("# only a comment\n", "no kid:secret entries"),
        (f"{K1}\nk2:sEcReT-short\n", "key 'k2': the secret is 12 bytes, at least 32"),
        ("sEcReT-without-any-kid-0123456789abcdef\n", "key #1: expected kid:secret"),
        (b"k1:\xff\xfesEcReT-0123456789abcdef0123456789", "is not UTF-8 text"),
    ],
)
def test_a_bad_file_names_itself_and_the_kid_never_the_secret(
    tmp_path: Path, text: str | bytes, message: str
) -> None:
    path = tmp_path / "keys"
    with pytest.raises(KeyringError, match=message) as info:
        from_file(path, text)
    assert str(path) in str(info.value) and "sEcReT" not in str(info.value)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere"
    with pytest.raises(KeyringError, match=f"cannot read the signing keys file {path}: No such"):
        load_keyring(load({"TRACKBUF_SIGNING_KEYS_FILE": str(path)}))
