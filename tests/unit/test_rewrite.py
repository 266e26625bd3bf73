from __future__ import annotations

import re

from trackbuf import tokens
from trackbuf.links import CLICK_PREFIX, OPEN_PREFIX, OPEN_SUFFIX
from trackbuf.rewrite import rewrite_html
from trackbuf.tokens import Keyring

KEYS = Keyring.parse("k1:rewrite-test-secret-0001-0123456789ab")
BASE = "https://t.example.com"

EMAIL = """<!doctype html>
<html><head><style>a[href="https://css.example/"] { color: red }</style></head>
<body>
  <!-- <a href="https://commented.example/">old</a> -->
  <p>Hello <b>friend</b>, see
  <a class="btn" href="https://shop.example/sale?a=1&amp;b=2">the sale</a>
  or <A HREF='https://shop.example/single'>single quotes</A>
  or <a href=https://shop.example/bare title="a > b">unquoted</a>.</p>
  <a href="mailto:help@shop.example">mail us</a> <a href="tel:+123">call</a>
  <a href="#top">top</a> <a href="/relative">relative</a> <a name="anchor">named</a>
  <a href="{{ unsubscribe_url }}">unsubscribe</a>
  <a href="https://shop.example/?u={{id}}">merge tag</a>
  <a data-trackbuf="off" href="https://shop.example/private">not tracked</a>
  <map><area shape="rect" coords="0,0,1,1" href="https://map.example/"></map>
  <script>var u = '<a href="https://script.example/">';</script>
</body>
</html>
"""


def rewrite(document: str = EMAIL) -> tuple[str, list[str]]:
    done = rewrite_html(document, BASE, KEYS, "spring", "user-42")
    clicks = re.findall(r'href="(https://t\.example\.com/c/[^"]+)"', done.html, re.IGNORECASE)
    return done.html, clicks


def target_of(click: str) -> str:
    payload = tokens.verify(KEYS, click.removeprefix(BASE + CLICK_PREFIX), "click")
    assert (payload.campaign, payload.recipient) == ("spring", "user-42")
    assert payload.url is not None
    return payload.url


def test_http_links_become_signed_clicks_to_the_same_target() -> None:
    _, clicks = rewrite()
    assert [target_of(c) for c in clicks] == [
        "https://shop.example/sale?a=1&b=2",  # as the browser reads it: entity decoded
        "https://shop.example/single",
        "https://shop.example/bare",
        "https://map.example/",
    ]


def test_everything_else_is_left_byte_for_byte() -> None:
    done = rewrite_html(EMAIL, BASE, KEYS, "spring", "user-42")
    tracked = re.sub(r'"https://t\.example\.com/c/[^"]+"', "LINK", done.html)
    tracked = re.sub(r'<img src="https://t\.example\.com/o/[^>]+>', "", tracked)
    original = EMAIL
    for raw in ('"https://shop.example/sale?a=1&amp;b=2"', "'https://shop.example/single'",
                "https://shop.example/bare", '"https://map.example/"'):  # fmt: skip
        original = original.replace(raw, "LINK")
    assert tracked == original


def test_what_is_not_an_http_link_is_skipped_with_a_reason() -> None:
    done = rewrite_html(EMAIL, BASE, KEYS, "spring", "user-42")
    skipped = dict(done.skipped)
    assert set(skipped) == {
        "mailto:help@shop.example",
        "tel:+123",
        "#top",
        "/relative",
        "{{ unsubscribe_url }}",
        "https://shop.example/?u={{id}}",
        "https://shop.example/private",
    }
    assert "template placeholder" in skipped["https://shop.example/?u={{id}}"]
    assert "data-trackbuf" in skipped["https://shop.example/private"]
    assert done.links == 4


def test_comments_scripts_and_styles_are_not_touched() -> None:
    html, _ = rewrite()
    for untouched in (
        '<!-- <a href="https://commented.example/">old</a> -->',
        "<script>var u = '<a href=\"https://script.example/\">';</script>",
        '<style>a[href="https://css.example/"] { color: red }</style>',
    ):
        assert untouched in html


def test_the_pixel_goes_before_the_closing_body_and_verifies() -> None:
    html, _ = rewrite()
    pixel = re.search(r'<img src="([^"]+)"[^>]*/>\s*</body>', html)
    assert pixel is not None
    token = pixel.group(1).removeprefix(BASE + OPEN_PREFIX).removesuffix(OPEN_SUFFIX)
    payload = tokens.verify(KEYS, token, "open")
    assert (payload.campaign, payload.recipient) == ("spring", "user-42")
    assert 'width="1" height="1"' in pixel.group()


def test_a_fragment_without_body_gets_the_pixel_at_the_end() -> None:
    done = rewrite_html('<p><a href="https://x.example/">x</a></p>', BASE, KEYS, "c", "r")
    assert done.html.startswith('<p><a href="https://t.example.com/c/')
    assert done.html.endswith("/>") and done.pixel_added


def test_rewriting_twice_changes_nothing_more() -> None:
    once = rewrite_html(EMAIL, BASE, KEYS, "spring", "user-42")
    twice = rewrite_html(once.html, BASE, KEYS, "spring", "user-42")
    assert twice.html == once.html
    assert twice.links == 0 and not twice.pixel_added
    assert sum(why == "already tracked" for _, why in twice.skipped) == 4


def test_unquoted_values_and_odd_quoting_are_read_as_a_browser_reads_them() -> None:
    cases = {
        # An unquoted value runs to whitespace or ">": "=" and "&" belong to it.
        "<a href=https://shop.example/?a=1&b=2>x</a>": "https://shop.example/?a=1&b=2",
        # An apostrophe inside an unquoted value opens no quote.
        "<a title=it's href='https://shop.example/q'>y</a>": "https://shop.example/q",
        # No space after a quoted value; a slash that is part of an unquoted one.
        '<a href="https://shop.example/a"title="t">z</a>': "https://shop.example/a",
        "<a href=https://shop.example/b/>w</a>": "https://shop.example/b/",
    }
    for document, target in cases.items():
        done = rewrite_html(document, BASE, KEYS, "spring", "user-42")
        (click,) = re.findall(r'href="(https://t\.example\.com/c/[^"]+)"', done.html)
        assert target_of(click) == target, document
        assert done.html.endswith("/>") and done.html.count("</a>") == 1


def test_a_broken_tag_is_left_alone_quickly() -> None:
    import time

    broken = "<a " + "b" * 50_000 + "='never closed"
    started = time.perf_counter()
    done = rewrite_html(broken, BASE, KEYS, "spring", "user-42")
    assert time.perf_counter() - started < 1.0  # no regex backtracking blow-up
    assert done.html.startswith(broken) and done.links == 0
