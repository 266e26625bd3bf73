"""Link safety against a real ingest: expiry, the redirect host allowlist, signing keys
from a file rotated with SIGHUP, and keys that must never be accepted or shown."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from loadtest.bench import scrape
from tests.integration.test_pipeline import drain, rows
from tests.procs import Process, start_ingest, trackbuf
from tests.servers import Beanstalkd
from trackbuf import links, tokens
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration

K1 = "k1:first-rotation-key-0123456789abcdef0123"
K2 = "k2:second-rotation-key-0123456789abcdef012"


async def get(url: str) -> tuple[int, str | None, str]:
    """One request on a connection of its own (so several workers all get asked)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get(url, allow_redirects=False) as response,
    ):
        body = (await response.read()).decode("latin-1")  # the pixel is binary
        return response.status, response.headers.get("Location"), body


def hit(url: str) -> tuple[int, str | None, str]:
    return asyncio.run(get(url))


def test_an_expired_link_serves_the_pixel_refuses_the_click_and_counts_it(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    settings: Settings = make_settings()
    base = f"http://{settings.listen}"
    past, future = int(time.time()) - 1, int(time.time()) + 3600
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    try:
        expired_click = hit(links.click_url(base, keyring, "c", "r", "https://x.example/",
                                            expires=past))  # fmt: skip
        expired_open = hit(links.open_url(base, keyring, "c", "r", expires=past))
        live_click = hit(links.click_url(base, keyring, "c", "r2", "https://x.example/",
                                         expires=future))  # fmt: skip
        metrics = scrape(settings.admin_listen)
    finally:
        assert ingest.terminate() == 0, ingest.log()
    status, location, page = expired_click
    assert (status, location) == (404, None) and "has expired" in page
    assert expired_open[0] == 200  # the pixel is always served
    assert live_click[:2] == (302, "https://x.example/")
    expired = 'trackbuf_ingest_invalid_tokens_total{{reason="expired",route="{}"}}'
    assert metrics[expired.format("click")] == 1 and metrics[expired.format("open")] == 1
    assert drain(settings) == 0
    assert [(r["kind"], r["recipient"]) for r in rows(settings.database_url)] == [("click", "r2")]


def test_clicks_go_only_to_allowed_hosts_when_a_list_is_set(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    settings: Settings = make_settings(redirect_hosts="shop.example.com,*.news.example.org")
    base = f"http://{settings.listen}"
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    try:
        answers = {
            target: hit(links.click_url(base, keyring, "c", "r", target))[:2]
            for target in (
                "https://shop.example.com/sale",
                "https://today.news.example.org/a",
                "https://evil.example/",
                "https://shop.example.com@evil.example/",
                "https://news.example.org/",
            )
        }
        metrics = scrape(settings.admin_listen)
    finally:
        assert ingest.terminate() == 0, ingest.log()
    assert answers == {
        "https://shop.example.com/sale": (302, "https://shop.example.com/sale"),
        "https://today.news.example.org/a": (302, "https://today.news.example.org/a"),
        "https://evil.example/": (404, None),
        "https://shop.example.com@evil.example/": (404, None),
        "https://news.example.org/": (404, None),
    }
    key = 'trackbuf_ingest_invalid_tokens_total{reason="host_not_allowed",route="click"}'
    assert metrics[key] == 3


def wait_for_status(url: str, status: int, times: int, timeout: float = 15) -> None:
    """Until ``times`` requests in a row (each on its own connection) get ``status``."""
    deadline, streak = time.monotonic() + timeout, 0
    while streak < times:
        assert time.monotonic() < deadline, f"{url} did not answer {status} {times} times"
        streak = streak + 1 if hit(url)[0] == status else 0
        if not streak:
            time.sleep(0.1)


def wait_for_log(process: Process, text: str, times: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while process.log().count(text) < times:
        assert time.monotonic() < deadline, process.log()
        time.sleep(0.1)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_rereads_the_keys_file_so_a_new_key_needs_no_restart(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path, workers: int
) -> None:
    keys_file = tmp_path / "signing_keys"
    keys_file.write_text(K1 + "\n")
    settings: Settings = make_settings(
        signing_keys="", signing_keys_file=str(keys_file), workers=workers,
        data_dir=str(tmp_path / "data"),
    )  # fmt: skip
    base = f"http://{settings.listen}"
    old_link = links.click_url(base, Keyring.parse(K1), "c", "r", "https://x.example/old")
    new_link = links.click_url(base, Keyring.parse(K2), "c", "r", "https://x.example/new")
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    try:
        wait_for_log(ingest, "event=ingest_listening", workers)  # every worker, not just one
        wait_for_status(old_link, 302, times=4)
        assert hit(new_link)[0] == 404  # k2 is not known yet
        keys_file.write_text(f"# rotated\n{K2}\n{K1}\n")
        ingest.proc.send_signal(signal.SIGHUP)
        wait_for_status(new_link, 302, times=4 * workers)
        assert hit(old_link)[:2] == (302, "https://x.example/old")  # old emails keep working
        # A broken file is refused and the keys in use stay: clicks never stop.
        keys_file.write_text("k3:sEcReT-much-too-short\n")
        ingest.proc.send_signal(signal.SIGHUP)
        wait_for_log(ingest, "event=signing_keys_not_reloaded", workers)
        for _ in range(4 * workers):
            assert hit(new_link)[0] == 302
        assert ingest.proc.poll() is None
    finally:
        assert ingest.terminate() == 0, ingest.log()
    log = ingest.log()
    assert log.count("event=signing_keys_reloaded") >= workers
    assert "key 'k3': the secret is 21 bytes" in log
    assert "sEcReT" not in log and K1.split(":")[1] not in log and K2.split(":")[1] not in log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_short_key_stops_ingest_at_start_naming_the_kid(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path, workers: str
) -> None:
    settings: Settings = make_settings(data_dir=str(tmp_path / "data"))
    done = trackbuf(
        settings, "ingest", "--workers", workers, timeout=30,
        TRACKBUF_SIGNING_KEYS=f"{K1},k0:sEcReT-of-20-bytes!!",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "key 'k0': the secret is 20 bytes, at least 32 are needed" in done.stderr
    assert "sEcReT" not in done.stderr + done.stdout and "Traceback" not in done.stderr


def test_signers_refuse_a_short_key_too_even_one_that_does_not_sign(make_settings) -> None:
    # docs/TOKENS.md: signers and verifiers alike refuse a secret under 32 bytes, in
    # every key of the list, not only the first (the one that signs).
    settings: Settings = make_settings()
    keys = f"{K1},k0:sEcReT-of-20-bytes!!"
    html = '<a href="https://shop.example/">x</a>'
    for command, stdin in (
        (["link", "open", "--campaign", "c", "--recipient", "r"], None),
        (["rewrite", "--campaign", "c", "--recipient", "r"], html),
    ):
        done = trackbuf(settings, *command, input=stdin, TRACKBUF_SIGNING_KEYS=keys)
        assert done.returncode == 2, done.stderr
        assert "key 'k0': the secret is 20 bytes, at least 32 are needed" in done.stderr
        assert done.stdout == "" and "sEcReT" not in done.stderr


def test_keys_never_show_in_help(make_settings, tmp_path: Path) -> None:
    settings: Settings = make_settings()
    for command in (["ingest"], ["link", "click"], ["rewrite"], ["up"]):
        shown = trackbuf(settings, *command, "--help", TRACKBUF_SIGNING_KEYS=K1)
        assert shown.returncode == 0, shown.stderr
        assert K1.split(":")[1] not in shown.stdout and "k1:***" in shown.stdout


def test_link_expires_after_the_duration_given(make_settings) -> None:
    settings: Settings = make_settings()
    before = int(time.time())
    made = trackbuf(settings, "link", "click", "--campaign", "c", "--recipient", "r",
                    "--url", "https://x.example/", "--expires", "90d")  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().rsplit("/c/", 1)[1]
    payload = tokens.verify(Keyring.parse(settings.signing_keys), token, "click")
    assert payload.expires is not None
    assert before + 90 * 86400 <= payload.expires <= int(time.time()) + 90 * 86400
    bad = trackbuf(settings, "link", "open", "--campaign", "c", "--recipient", "r",
                   "--expires", "3 months")  # fmt: skip
    assert bad.returncode == 2 and "positive number and a unit" in bad.stderr
