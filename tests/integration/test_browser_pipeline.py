"""A real browser reads a tracked email: headless Chromium loads the pixel and follows a
link through ingest to its target, and the consumer stores one open and one click."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import pytest

from tests.integration.test_pipeline import drain, rows
from tests.integration.test_rewrite_browser import BROWSER, needs_browser
from tests.procs import start_ingest
from tests.servers import free_port, local_site
from trackbuf.rewrite import rewrite_html
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration

DESKTOP_CHROME = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                  "Chrome/156.0.0.0 Safari/537.36")  # fmt: skip

# Once the page (and so the pixel: images hold the load event) has loaded, follow the
# first link as a click would: the browser requests the click URL, gets ingest's 302
# and lands on the target page.
EMAIL = """<!doctype html><html><head><meta charset="utf-8"></head><body>
<table><tr><td>
<p>Our spring sale starts today.</p>
<a href="{target}">See the sale</a>
</td></tr></table>
<script>
window.addEventListener("load", () => {{ location.href = document.querySelector("a").href; }});
</script>
</body></html>"""
LANDING = b"<!doctype html><html><body><h1 id='landed'>The sale</h1></body></html>"


class Site(BaseHTTPRequestHandler):
    """Serves the tracked email at /email.html and the link's target at /sale."""

    email: ClassVar[bytes] = b""
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        body = self.email if self.path == "/email.html" else LANDING
        self.send_response(200 if self.path == "/email.html" or self.path.startswith("/sale")
                           else 404)  # fmt: skip
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def site() -> Iterator[str]:
    Site.seen = []
    with local_site(Site) as url:
        yield url


@needs_browser
def test_chromium_opens_a_tracked_email_and_clicks_through_to_the_target(
    make_settings, keyring: Keyring, site: str, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    settings = make_settings(listen=listen, public_url=f"http://{listen}")
    target = f"{site}/sale?utm_source=mail&item=42"
    tracked = rewrite_html(
        EMAIL.format(target=target), settings.public_url, keyring, "spring", "user-42"
    )
    assert tracked.pixel_added and target not in tracked.html  # the link now goes via ingest
    Site.email = tracked.html.encode()
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    try:
        assert BROWSER is not None
        done = subprocess.run(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             # The user agent of a person's desktop Chrome: headless Chromium says
             # "HeadlessChrome", an automation, which trackbuf rightly files as a bot.
             f"--user-agent={DESKTOP_CHROME}",
             # Let the load handler's navigation happen before the DOM is dumped.
             "--virtual-time-budget=10000", "--dump-dom", f"{site}/email.html"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        assert ingest.terminate() == 0
    # The browser landed on the target page, with the exact query string.
    assert "/sale?utm_source=mail&item=42" in Site.seen, (Site.seen, done.stderr[-2000:])
    assert 'id="landed"' in done.stdout, done.stdout[-2000:]
    assert drain(settings) == 0
    stored = rows(settings.database_url, "SELECT kind, campaign, recipient, url, user_agent,"
                  " machine, machine_reason FROM events ORDER BY kind")  # fmt: skip
    assert [(r["kind"], r["campaign"], r["recipient"]) for r in stored] == [
        ("click", "spring", "user-42"),
        ("open", "spring", "user-42"),
    ]
    click, pixel = stored
    assert click["url"] == target
    assert pixel["url"] is None
    for row in stored:
        assert row["user_agent"] == DESKTOP_CHROME  # sent by the browser itself
    # A browser opening and clicking, one after the other: a person, not a machine.
    assert [(r["machine"], r["machine_reason"]) for r in stored] == [(False, None)] * 2
