"""Where the signing keys come from: TRACKBUF_SIGNING_KEYS, or a file of them.

The file (TRACKBUF_SIGNING_KEYS_FILE) holds the same ``kid:secret`` entries, one a line
or comma-separated; blank lines and lines starting with ``#`` are skipped. Ingest
re-reads it on SIGHUP, so a key rotates without a restart.
"""

from __future__ import annotations

from pathlib import Path

from trackbuf.settings import Settings, env_name
from trackbuf.tokens import Keyring, KeyringError


def load_keyring(settings: Settings) -> Keyring:
    """The keyring the settings name; a KeyringError says what to fix (never a secret)."""
    path = settings.signing_keys_file
    if path and settings.signing_keys:
        raise KeyringError(
            f"set {env_name('signing_keys')} or {env_name('signing_keys_file')}, not both"
        )
    if not path:
        return Keyring.parse(settings.signing_keys)
    spec = read_keys_file(path)
    if not spec:
        raise KeyringError(f"signing keys file {path}: no kid:secret entries in it")
    try:
        return Keyring.parse(spec)
    except KeyringError as exc:
        raise KeyringError(f"signing keys file {path}: {exc}") from None


def read_keys_file(path: str) -> str:
    """The file's entries as ``kid:secret,kid:secret``, for Keyring.parse."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyringError(f"cannot read the signing keys file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        # The exception's text quotes the bytes around the error: part of a secret.
        raise KeyringError(f"signing keys file {path} is not UTF-8 text") from None
    lines = (line.strip() for line in text.splitlines())
    return ",".join(line for line in lines if line and not line.startswith("#"))
