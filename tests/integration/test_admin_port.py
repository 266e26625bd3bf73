"""The public listener answers tracking and health only; /metrics is on the private
admin address, and counts every worker of a ``--workers N`` ingest."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ingest.app import TALLY_FLUSH_S
from tests.procs import Process, start_ingest, trackbuf
from tests.servers import Beanstalkd, free_port
from trackbuf import links
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration

NO_INDEX = "noindex, nofollow"


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_the_public_port_serves_no_metrics_and_every_answer_says_noindex(
    make_settings, keyring: Keyring, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings()
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    base = f"http://{settings.listen}"
    pixel = links.open_url(base, keyring, "c", "r")
    click = links.click_url(base, keyring, "c", "r", "https://shop.example/")
    try:
        answers = {
            "pixel": fetch(pixel),
            "click": fetch(click),
            "forged click": fetch(f"{base}/c/k1.forged.token"),
            "healthz": fetch(f"{base}/healthz"),
            "readyz": fetch(f"{base}/readyz"),
            "robots": fetch(f"{base}/robots.txt"),
            "metrics": fetch(f"{base}/metrics"),
            "unknown": fetch(f"{base}/admin"),
            "post": fetch(pixel, method="POST"),
        }
        admin = fetch(f"http://{settings.admin_listen}/metrics")
    finally:
        assert ingest.terminate() == 0
    statuses = {name: answer[0] for name, answer in answers.items()}
    assert statuses == {"pixel": 200, "click": 302, "forged click": 404, "healthz": 200,
                        "readyz": 200, "robots": 200, "metrics": 404, "unknown": 404,
                        "post": 405}  # fmt: skip
    for name, (_, headers, _) in answers.items():
        assert headers.get("X-Robots-Tag") == NO_INDEX, name
    assert answers["robots"][2] == b"User-agent: *\nDisallow: /\n"
    assert b"trackbuf_ingest" not in answers["metrics"][2]
    status, _, body = admin
    assert status == 200
    assert b'trackbuf_ingest_requests_total{outcome="queued",route="open"} 1.0' in body


def test_metrics_on_the_admin_port_count_every_worker(
    make_settings, keyring: Keyring, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings(workers=2)
    ingest = Process(settings, "ingest", log_path=tmp_path / "ingest.log")
    ingest.wait_http(f"http://{settings.admin_listen}/metrics")
    ingest.wait_http(f"http://{settings.listen}/healthz")
    pixel = links.open_url(f"http://{settings.listen}", keyring, "c", "r")
    try:
        # New connections each time: the kernel hands them to either worker.
        assert all(fetch(pixel)[0] == 200 for _ in range(60))
        # The worker not answering a scrape adds its tally every TALLY_FLUSH_S.
        time.sleep(TALLY_FLUSH_S + 0.5)
        totals = []
        for _ in range(3):  # any worker may answer the scrape: each reports all
            _, _, body = fetch(f"http://{settings.admin_listen}/metrics")
            line = next(
                line for line in body.decode().splitlines()
                if line.startswith('trackbuf_ingest_requests_total{outcome="queued",route="open"}')
            )  # fmt: skip
            totals.append(float(line.rsplit(" ", 1)[1]))
    finally:
        assert ingest.terminate() == 0
    assert totals == [60.0, 60.0, 60.0]


def test_a_taken_admin_address_stops_ingest_with_the_flag_that_moves_it(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings()
    first = start_ingest(settings, tmp_path / "first.log")
    try:
        second = trackbuf(settings, "ingest", "--listen", f"127.0.0.1:{free_port()}",
                          "--data-dir", str(tmp_path / "second"), timeout=30)  # fmt: skip
    finally:
        assert first.terminate() == 0
    assert second.returncode == 2, second.stderr
    assert f"cannot listen on {settings.admin_listen}" in second.stderr
    assert "--admin-listen or TRACKBUF_ADMIN_LISTEN" in second.stderr
    assert "Traceback" not in second.stderr
