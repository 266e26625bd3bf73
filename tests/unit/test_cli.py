"""The command line's parsing: boolean flags both ways, secrets masked in --help."""

from __future__ import annotations

from pathlib import Path

import pytest

from commands import main as cli
from tests.conftest import KEYS


@pytest.fixture(autouse=True)
def _no_env_file_around(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("TRACKBUF_DATA_DIR", "TRACKBUF_SIGNING_KEYS", "TRACKBUF_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "300")


def test_boolean_settings_can_be_turned_off_on_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRACKBUF_BURST", "1")
    monkeypatch.setenv("TRACKBUF_TRUST_FORWARDED", "yes")
    monkeypatch.setenv("TRACKBUF_DATABASE_URL", "postgresql://db/x")
    monkeypatch.setenv("TRACKBUF_SIGNING_KEYS", KEYS)
    parser = cli.build_parser()
    assert cli._settings(parser.parse_args(["consume"])).burst is True
    assert cli._settings(parser.parse_args(["consume", "--no-burst"])).burst is False
    assert cli._settings(parser.parse_args(["ingest"])).trust_forwarded is True
    off = parser.parse_args(["ingest", "--no-trust-forwarded"])
    assert cli._settings(off).trust_forwarded is False
    monkeypatch.setenv("TRACKBUF_BURST", "0")
    assert cli._settings(parser.parse_args(["consume", "--burst"])).burst is True


def test_help_shows_values_in_force_with_secrets_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "TRACKBUF_DATABASE_URL", "postgresql://app:hunter2@db:5432/x?sslmode=require"
    )
    monkeypatch.setenv("TRACKBUF_SIGNING_KEYS", KEYS)
    monkeypatch.setenv("TRACKBUF_THREADS", "7")
    for argv in (["consume", "--help"], ["ingest", "--help"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(argv)
    shown = capsys.readouterr().out
    assert "hunter2" not in shown and "second-key" not in shown and "first-key" not in shown
    assert "now: postgresql://app:***@db:5432/x?sslmode=require]" in shown
    assert "now: k2:***,k1:***]" in shown
    assert "now: 7]" in shown


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://app:s3cret@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app@db/x", "postgresql://app@db/x"),
        ("postgresql://db/x?user=app&password=s3cret", "postgresql://db/x?user=app&password=***"),
        (
            "postgresql://postgres:@/postgres?host=/tmp/pg",
            "postgresql://postgres:@/postgres?host=/tmp/pg",
        ),
        ("host=db password=s3cret", "(set, not shown)"),
    ],
)
def test_a_dsn_is_shown_without_its_password(dsn: str, shown: str) -> None:
    from trackbuf.redact import masked

    assert masked("database_url", dsn) == shown
    assert masked("signing_keys", "k1:" + "x" * 40) == "k1:***"
