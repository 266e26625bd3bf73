"""The command line away from (or beside) a `trackbuf up`: which settings each command
reads, and what it says when one is missing or wrong. Real processes, no `up` needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import KEYS
from tests.servers import free_port
from trackbuf.tokens import Keyring, verify

pytestmark = pytest.mark.acceptance
ROOT = Path(__file__).resolve().parents[2]
ENV_FILE = "trackbuf.env"


def cli(
    *args: str, cwd: Path, timeout: float = 60, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKBUF_")}
    env.update(extra, PYTHONPATH=str(ROOT), COLUMNS="300")
    return subprocess.run(
        [sys.executable, "-m", "commands", *args],
        env=env, capture_output=True, text=True, cwd=cwd, timeout=timeout,
    )  # fmt: skip


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_stale_env_file_is_ignored_with_a_warning(tmp_path: Path) -> None:
    # What a `trackbuf up` killed with SIGKILL leaves behind: its DSN must not be used.
    gone = dead_pid()
    (tmp_path / ENV_FILE).write_text(
        f"TRACKBUF_UP_PID={gone}\nTRACKBUF_UP_STARTED=1\n"
        f"TRACKBUF_DATABASE_URL=postgresql://stale@127.0.0.1:{free_port()}/gone\n"
    )
    shown = cli("events", cwd=tmp_path, TRACKBUF_DATA_DIR=str(tmp_path))
    assert shown.returncode == 2, shown.stderr
    assert "Traceback" not in shown.stderr
    assert f"ignoring {tmp_path / ENV_FILE}" in shown.stderr
    assert f"pid {gone}" in shown.stderr
    assert "TRACKBUF_DATABASE_URL is not set" in shown.stderr


def test_only_operator_commands_read_the_env_file(tmp_path: Path) -> None:
    from trackbuf import envfile

    # A fresh file (its owner, this test, is alive), as a running `up` writes it.
    envfile.write(
        tmp_path / ENV_FILE,
        {
            "TRACKBUF_SIGNING_KEYS": KEYS,
            "TRACKBUF_PUBLIC_URL": "http://up.example:8080",
            "TRACKBUF_DATABASE_URL": f"postgresql://x@127.0.0.1:{free_port()}/y",
        },
    )
    link = cli("link", "open", "--campaign", "c", "--recipient", "r",
               cwd=tmp_path, TRACKBUF_DATA_DIR=str(tmp_path))  # fmt: skip
    assert link.returncode == 0, link.stderr
    assert link.stdout.startswith("http://up.example:8080/o/")
    # ingest and consume are production processes: only their own environment counts.
    listen = f"127.0.0.1:{free_port()}"
    ingest = cli("ingest", "--listen", listen, cwd=tmp_path, timeout=20,
                 TRACKBUF_DATA_DIR=str(tmp_path))  # fmt: skip
    assert ingest.returncode == 2 and "TRACKBUF_SIGNING_KEYS" in ingest.stderr, ingest.stderr
    consume = cli("consume", "--burst", "--metrics-listen", f"127.0.0.1:{free_port()}",
                  cwd=tmp_path, timeout=20, TRACKBUF_DATA_DIR=str(tmp_path))  # fmt: skip
    assert consume.returncode == 2, consume.stderr
    assert "TRACKBUF_DATABASE_URL is not set" in consume.stderr


def test_commands_away_from_up_say_what_is_missing_and_where_to_look(tmp_path: Path) -> None:
    events = cli("events", cwd=tmp_path)
    assert events.returncode == 2
    assert "TRACKBUF_DATABASE_URL is not set" in events.stderr
    assert "TRACKBUF_DATA_DIR" in events.stderr and "trackbuf up" in events.stderr
    link = cli("link", "open", "--campaign", "c", "--recipient", "r", cwd=tmp_path)
    assert link.returncode == 2
    assert "TRACKBUF_SIGNING_KEYS is not set" in link.stderr
    assert "TRACKBUF_DATA_DIR" in link.stderr


@pytest.mark.parametrize(
    "url", ["javascript:alert(1)", "/relative/path", "https://exa mple.com/", "https:///no-host"]
)
def test_link_click_refusal_says_what_a_url_must_look_like(tmp_path: Path, url: str) -> None:
    shown = cli("link", "click", "--campaign", "c", "--recipient", "r", "--url", url,
                cwd=tmp_path, TRACKBUF_SIGNING_KEYS=KEYS)  # fmt: skip
    assert shown.returncode == 2
    assert f"--url must be an absolute http(s) URL with a host, got {url!r}" in shown.stderr
    assert "bad_url" not in shown.stderr


def test_click_targets_are_signed_exactly_as_written(tmp_path: Path) -> None:
    # Documented choice: no case folding of scheme or host, no other rewriting.
    target = "HTTPS://Shop.Example/Sale?Q=1"
    shown = cli("link", "click", "--campaign", "c", "--recipient", "r", "--url", target,
                cwd=tmp_path, TRACKBUF_SIGNING_KEYS=KEYS)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    token = shown.stdout.strip().rpartition("/c/")[2]
    assert verify(Keyring.parse(KEYS), token, "click").url == target


def test_stats_for_a_campaign_without_events_says_so(database_url: str, tmp_path: Path) -> None:
    dsn = database_url
    text = cli("stats", "--campaign", "never-sent", cwd=tmp_path, TRACKBUF_DATABASE_URL=dsn)
    assert text.returncode == 0, text.stderr
    assert "no events stored for campaign 'never-sent'" in text.stdout
    as_json = cli("stats", "--campaign", "never-sent", "--json",
                  cwd=tmp_path, TRACKBUF_DATABASE_URL=dsn)  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr
    report = orjson.loads(as_json.stdout)
    assert report["campaign"] == "never-sent"
    assert report["open"]["total"] == 0 and report["click"]["total"] == 0


def test_a_reader_that_stops_early_ends_the_command_quietly(
    database_url: str, tmp_path: Path
) -> None:
    """`trackbuf events | head -1`: the reader closes the pipe; the command exits 0 and
    says nothing (no traceback, no CRITICAL log line), as cat or grep would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKBUF_")}
    env.update(PYTHONPATH=str(ROOT), TRACKBUF_DATABASE_URL=database_url)
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that is already gone: the first line meets EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "commands", "events"], env=env, stdout=write_end,
            stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@pytest.mark.parametrize(
    ("argv", "usage", "said"),
    [
        (["stats", "--campain", "spring"], "usage: trackbuf stats",
         "unrecognized option --campain (did you mean --campaign?)"),
        (["events", "--folow"], "usage: trackbuf events",
         "unrecognized option --folow (did you mean --follow?)"),
        (["link", "open", "--recipent", "r", "--campaign", "c"], "usage: trackbuf link open",
         "unrecognized option --recipent (did you mean --recipient?)"),
        (["evnts"], "usage: trackbuf ", "invalid choice: 'evnts'"),
        (["dead", "lst"], "usage: trackbuf dead", "(did you mean list?)"),
    ],
)  # fmt: skip
def test_a_typo_is_named_with_what_was_meant(
    tmp_path: Path, argv: list[str], usage: str, said: str
) -> None:
    done = cli(*argv, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(usage), done.stderr
    assert said in done.stderr, done.stderr


def test_events_follows_with_tail_or_follow(tmp_path: Path) -> None:
    helped = cli("events", "--help", cwd=tmp_path)
    assert "--tail, --follow" in helped.stdout


def test_help_never_breaks_a_value_inside_a_word(tmp_path: Path) -> None:
    dsn = "postgresql://trackbuf@db-primary.example.internal:5432/trackbuf-production"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKBUF_")}
    env.update(PYTHONPATH=str(ROOT), COLUMNS="80", TRACKBUF_DATABASE_URL=dsn)
    helped = subprocess.run(
        [sys.executable, "-m", "commands", "consume", "--help"],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert dsn in helped.stdout, helped.stdout


def test_an_unreachable_server_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    nowhere = f"postgresql://trackbuf@127.0.0.1:{free_port()}/trackbuf"
    done = cli("events", cwd=tmp_path, TRACKBUF_DATABASE_URL=nowhere)
    assert done.returncode == 1
    assert done.stderr.startswith("trackbuf events: cannot reach a server it needs"), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_status_says_which_servers_it_checks_and_where_it_found_them(tmp_path: Path) -> None:
    """Away from `up`, status checks the default address and says so; beside a
    running `up` it names the env file; an exported address is named as such."""
    from trackbuf import envfile

    def source(**extra: str) -> str:
        done = cli("status", "--json", "--interval", "0.1", "--ingest-url", "",
                   "--consumer-url", "", cwd=tmp_path, **extra)  # fmt: skip
        assert done.returncode in (0, 1), done.stderr
        found: str = orjson.loads(done.stdout)["source"]
        return found

    away = source()
    assert away.startswith("beanstalkd 127.0.0.1:11300 (from the default")
    assert "TRACKBUF_DATA_DIR" in away
    ours = f"127.0.0.1:{free_port()}"
    envfile.write(tmp_path / ENV_FILE, {"TRACKBUF_BEANSTALKD": ours})
    beside_up = source(TRACKBUF_DATA_DIR=str(tmp_path))
    assert beside_up.startswith(f"beanstalkd {ours} (from {tmp_path / ENV_FILE}")
    exported = f"127.0.0.1:{free_port()}"
    assert source(TRACKBUF_BEANSTALKD=exported) == (
        f"beanstalkd {exported} (from $TRACKBUF_BEANSTALKD)"
    )
