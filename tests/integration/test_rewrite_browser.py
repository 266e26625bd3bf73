"""What the rewriter reads in an href, and where it puts the pixel, checked against a real
browser: headless Chromium, when installed (`apt-get install chromium`)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import pytest

from tests.servers import local_site
from tests.unit.test_rewrite import HREFS, KEYS, href_target
from trackbuf.rewrite import rewrite_html

pytestmark = pytest.mark.integration

BROWSER = next(
    (
        found
        for name in ("chromium", "chromium-browser", "google-chrome")
        if (found := shutil.which(name))
    ),
    None,
)
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="no chromium on PATH (apt-get install chromium) to compare with"
)
# The script writes what the browser computed into the DOM, which --dump-dom prints.
REPORT = """<script>
window.addEventListener("load", () => {
  document.getElementById("out").textContent = JSON.stringify(report());
});
</script><pre id="out"></pre>"""


def browse(page: Path, tmp_path: Path) -> object:
    """Load ``page`` in headless Chromium and return what its report() found."""
    assert BROWSER is not None
    done = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = re.search(r'<pre id="out">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found and found.group(1), done.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


@needs_browser
def test_the_signed_target_is_the_url_chromium_follows(tmp_path: Path) -> None:
    anchors = "\n".join(f'<a href="{raw}">{i}</a>' for i, (raw, _) in enumerate(HREFS))
    page = tmp_path / "hrefs.html"
    page.write_text(
        f'<!doctype html><meta charset="utf-8"><body>{anchors}{REPORT}'
        "<script>function report() {"
        " return [...document.querySelectorAll('a')].map(a => a.href); }</script>",
        encoding="utf-8",
    )
    followed = browse(page, tmp_path)
    assert isinstance(followed, list) and len(followed) == len(HREFS)
    ours = [href_target(raw) for raw, _ in HREFS]
    # Our target goes out in a Location header, which the browser parses with the same
    # URL parser: compare what both parse to.
    check = tmp_path / "ours.html"
    check.write_text(
        f'<!doctype html><meta charset="utf-8"><body>{REPORT}<script>'
        f"function report() {{ return {json.dumps(ours)}.map(u => u && new URL(u).href); }}"
        "</script>",
        encoding="utf-8",
    )
    parsed = browse(check, tmp_path)
    assert isinstance(parsed, list)
    for (raw, _), browser_url, our_url in zip(HREFS, followed, parsed, strict=True):
        if our_url is None:  # left as is: the browser must not see an http(s) URL either
            assert not str(browser_url).startswith("http"), (raw, browser_url)
        else:
            assert our_url == browser_url, raw


class PixelServer(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []
    GIF = bytes.fromhex(
        "47494638396101000100800000ffffff00000021f90401000000002c00000000010001000002024401003b"
    )

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/gif")
        self.send_header("Content-Length", str(len(self.GIF)))
        self.end_headers()
        self.wfile.write(self.GIF)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def pixel_server() -> Iterator[str]:
    PixelServer.seen = []
    with local_site(PixelServer) as url:
        yield url


DARK_FOOTER = """<!doctype html><html><head><meta charset="utf-8"></head>
<body style="margin:0;background:#ffffff">
<table width="100%" cellpadding="0" cellspacing="0" style="background:#1a1a1a"><tr>
<td style="color:#eee;padding:20px">Footer<br>Unsubscribe</td></tr></table>
{report}<script>function report() {{
  return document.documentElement.getBoundingClientRect().height; }}</script>
</body></html>"""


@needs_browser
def test_the_pixel_adds_no_height_and_is_fetched(tmp_path: Path, pixel_server: str) -> None:
    original = DARK_FOOTER.format(report=REPORT)
    done = rewrite_html(original, pixel_server, KEYS, "spring", "user-42")
    assert done.pixel_added
    heights = []
    for name, document in (("original.html", original), ("tracked.html", done.html)):
        page = tmp_path / name
        page.write_text(document, encoding="utf-8")
        heights.append(browse(page, tmp_path))
    assert heights[0] == heights[1]  # not one pixel of page below the dark footer
    assert [p for p in PixelServer.seen if p.startswith("/o/")], PixelServer.seen
