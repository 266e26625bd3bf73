from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import KEYS
from trackbuf.settings import Settings, SettingsError, as_environ, load


def test_defaults_follow_the_design() -> None:
    settings = load({})
    assert settings.beanstalkd == "127.0.0.1:11300"
    assert settings.tube == "trackbuf-events"
    assert settings.threads == 4 and settings.batch_size == 1000 and settings.linger_ms == 200


def test_a_pool_of_beanstalkd_servers_is_a_comma_separated_list() -> None:
    assert load({}).beanstalkd_addresses == [("127.0.0.1", 11300)]
    pool = load({"TRACKBUF_BEANSTALKD": "10.0.0.1:11300, q2.internal:11301,[::1]:11302"})
    assert pool.beanstalkd_addresses == [
        ("10.0.0.1", 11300), ("q2.internal", 11301), ("::1", 11302)
    ]  # fmt: skip


def test_environment_is_read_and_flags_win() -> None:
    env = {"TRACKBUF_THREADS": "8", "TRACKBUF_BURST": "yes", "TRACKBUF_LINGER_MS": "5"}
    settings = load(env, overrides={"threads": 2})
    assert settings.threads == 2
    assert settings.burst is True
    assert settings.linger_ms == 5


def test_round_trip_through_the_environment() -> None:
    settings = load({}, overrides={"threads": 3, "trust_forwarded": True, "ip_mode": "drop"})
    assert load(as_environ(settings)) == settings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TRACKBUF_THREADS": "many"}, "TRACKBUF_THREADS must be a number"),
        ({"TRACKBUF_THREADS": "0"}, "TRACKBUF_THREADS must be at least 1"),
        ({"TRACKBUF_BEANSTALKD": "localhost"}, "TRACKBUF_BEANSTALKD must be host:port"),
        ({"TRACKBUF_BEANSTALKD": "a:1,,b:2"}, "TRACKBUF_BEANSTALKD must be host:port or"),
        ({"TRACKBUF_BEANSTALKD": "a:1,b"}, "TRACKBUF_BEANSTALKD must be host:port"),
        ({"TRACKBUF_BEANSTALKD": "a:1, a:1"}, "TRACKBUF_BEANSTALKD names a:1 twice"),
        ({"TRACKBUF_IP_MODE": "hash"}, "TRACKBUF_IP_MODE"),
        ({"TRACKBUF_USER_AGENT_MODE": "hash"}, "TRACKBUF_USER_AGENT_MODE must be full or drop"),
        ({"TRACKBUF_BURST": "maybe"}, "must be a boolean"),
        ({"TRACKBUF_PUBLIC_URL": "t.example.com"}, "must start with http"),
        # ingest's spool must read back every job it holds: one job may not pass 1 MiB.
        ({"TRACKBUF_MAX_JOB_BYTES": "1048577"}, "TRACKBUF_MAX_JOB_BYTES must be at most 1048576"),
        ({"TRACKBUF_TUBE": "two words"}, "TRACKBUF_TUBE: bad tube name"),
        ({"TRACKBUF_JOB_LINGER_MS": "-1"}, "TRACKBUF_JOB_LINGER_MS must be between 0 and 50"),
        ({"TRACKBUF_JOB_LINGER_MS": "200"}, "TRACKBUF_JOB_LINGER_MS must be between 0 and 50"),
        ({"TRACKBUF_JOB_LINGER_MS": "soon"}, "TRACKBUF_JOB_LINGER_MS must be a number"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load(env)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.threads = 9  # type: ignore[misc]


def test_missing_database_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="TRACKBUF_DATABASE_URL is not set"):
        Settings().require_database()


def test_an_unusable_setting_stops_ingest_with_the_reason_and_no_traceback() -> None:
    env = {**os.environ, "TRACKBUF_MAX_JOB_BYTES": "2000000", "TRACKBUF_SIGNING_KEYS": KEYS}
    done = subprocess.run(
        [sys.executable, "-m", "commands", "ingest"], env=env, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "TRACKBUF_MAX_JOB_BYTES must be at most 1048576" in done.stderr
    assert "Traceback" not in done.stderr


def test_secrets_are_masked_in_the_settings_repr() -> None:
    settings = load(
        {},
        overrides={
            "signing_keys": "k1:sEcReT-0123456789abcdef0123456789",
            "database_url": "postgresql://trackbuf:pAsSwOrD@db:5432/trackbuf",
        },
    )
    shown = repr(settings)
    assert "sEcReT" not in shown and "pAsSwOrD" not in shown
    assert "signing_keys='k1:***'" in shown and "postgresql://trackbuf:***@db:5432" in shown
