"""`trackbuf rewrite` as a sender uses it: HTML in, tracked HTML out, and the tracked
email's links and pixel work against a real ingest, with rows to show for it."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.integration.test_pipeline import drain, hit_all, rows
from tests.procs import start_ingest, trackbuf
from tests.servers import Beanstalkd

pytestmark = pytest.mark.integration

EMAIL = """<html><body>
<p>Our <a href="https://shop.example/sale?utm_source=mail&amp;x=1">sale</a> is on.</p>
<p><a href="mailto:help@shop.example">Write to us</a></p>
</body></html>
"""


def test_a_rewritten_email_redirects_and_records_its_open_and_click(
    make_settings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    settings = make_settings()
    public = {"TRACKBUF_PUBLIC_URL": f"http://{settings.listen}"}
    who = ("--campaign", "summer", "--recipient", "ann@example.com")
    source, tracked = tmp_path / "email.html", tmp_path / "tracked.html"
    source.write_text(EMAIL)
    done = trackbuf(settings, "rewrite", *who, "--input", str(source), "--output", str(tracked),
                    **public)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1 link(s) tracked, 1 left as is, open pixel added" in done.stderr
    assert "mailto:help@shop.example" in done.stderr  # says what it left alone
    html = tracked.read_text()
    (click,) = re.findall(r'href="(http://[^"]+/c/[^"]+)"', html)
    (pixel,) = re.findall(r'<img src="(http://[^"]+/o/[^"]+\.gif)"', html)

    piped = trackbuf(settings, "rewrite", *who, input=EMAIL, **public)
    assert piped.returncode == 0 and piped.stdout.count("/c/") == 1  # stdin to stdout

    ingest = start_ingest(settings)
    try:
        answers = asyncio.run(hit_all([click, pixel], concurrency=1))
    finally:
        assert ingest.terminate() == 0
    assert answers == [(302, "https://shop.example/sale?utm_source=mail&x=1"), (200, None)]
    assert drain(settings) == 0
    stored = {
        (r["kind"], r["campaign"], r["recipient"], r["url"]) for r in rows(settings.database_url)
    }
    assert stored == {
        ("click", "summer", "ann@example.com", "https://shop.example/sale?utm_source=mail&x=1"),
        ("open", "summer", "ann@example.com", None),
    }
