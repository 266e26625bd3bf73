from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from trackbuf import tokens
from trackbuf.links import CLICK_PREFIX, OPEN_PREFIX, OPEN_SUFFIX
from trackbuf.rewrite import rewrite_html
from trackbuf.tokens import Keyring

KEYS_TEXT = "k1:rewrite-test-secret-0001-0123456789ab"
KEYS = Keyring.parse(KEYS_TEXT)
ROOT = Path(__file__).resolve().parent.parent.parent
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
    tracked = re.sub(r'<div style="[^"]*"><img src="https://t\.example\.com/o/[^>]+></div>', "",
                     tracked)  # fmt: skip
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
    html, _ = rewrite()  # no table cell: the pixel goes just before </body>
    pixel = re.search(r'<img src="([^"]+)"[^>]*/></div>\s*</body>', html)
    assert pixel is not None
    token = pixel.group(1).removeprefix(BASE + OPEN_PREFIX).removesuffix(OPEN_SUFFIX)
    payload = tokens.verify(KEYS, token, "open")
    assert (payload.campaign, payload.recipient) == ("spring", "user-42")
    assert 'width="1" height="1"' in pixel.group()


def test_a_fragment_without_body_gets_the_pixel_at_the_end() -> None:
    done = rewrite_html('<p><a href="https://x.example/">x</a></p>', BASE, KEYS, "c", "r")
    assert done.html.startswith('<p><a href="https://t.example.com/c/')
    assert done.html.endswith("/></div>") and done.pixel_added


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
        assert done.html.endswith("/></div>") and done.html.count("</a>") == 1


def test_a_broken_tag_is_left_alone_quickly() -> None:
    import time

    broken = "<a " + "b" * 50_000 + "='never closed"
    started = time.perf_counter()
    done = rewrite_html(broken, BASE, KEYS, "spring", "user-42")
    assert time.perf_counter() - started < 1.0  # no regex backtracking blow-up
    assert done.html.startswith(broken) and done.links == 0


# An href as written in the HTML, and the URL a browser follows for it (checked against
# Chromium in tests/integration/test_rewrite_browser.py). Inside an attribute a legacy
# reference with no ";" (&reg, &sect, &times, &curren, &para, &copy, &not) is left as
# written when a letter, digit or "=" follows; with ";", or before anything else, it is
# decoded like any other.
HREFS = [
    ("https://x.example/?id=1&region=us", "https://x.example/?id=1&region=us"),
    ("https://x.example/?id=1&amp;region=us", "https://x.example/?id=1&region=us"),
    ("https://x.example/?a=1&section=2", "https://x.example/?a=1&section=2"),
    ("https://x.example/?a=1&amp;section=2", "https://x.example/?a=1&section=2"),
    ("https://x.example/?a=1&timestamp=2", "https://x.example/?a=1&timestamp=2"),
    ("https://x.example/?a=1&currency=eur", "https://x.example/?a=1&currency=eur"),
    ("https://x.example/?a=1&param=2", "https://x.example/?a=1&param=2"),
    ("https://x.example/?a=1&copy=2", "https://x.example/?a=1&copy=2"),
    ("https://x.example/?a=1&amp;copy=2", "https://x.example/?a=1&copy=2"),
    ("https://x.example/?a=1&notif_id=2", "https://x.example/?a=1&notif_id=2"),
    ("https://x.example/?a=1&reg2=x", "https://x.example/?a=1&reg2=x"),
    ("https://x.example/?a=1&ampb=2", "https://x.example/?a=1&ampb=2"),
    ("https://x.example/?a=1&amp=2", "https://x.example/?a=1&amp=2"),
    # With ";" the reference is decoded, in an attribute as anywhere.
    ("https://x.example/?a=1&copy;b", "https://x.example/?a=1%C2%A9b"),
    ("https://x.example/?a=1&region;=us", "https://x.example/?a=1&region;=us"),  # no such name
    ("https://x.example/?a=1&AMP;b=2", "https://x.example/?a=1&b=2"),
    # Followed by neither a letter, a digit nor "=", a legacy reference is decoded.
    ("https://x.example/?a=1&not_id=2", "https://x.example/?a=1%C2%AC_id=2"),
    ("https://x.example/?a=1&reg", "https://x.example/?a=1%C2%AE"),
    ("https://x.example/?a=1&amp", "https://x.example/?a=1&"),
    # Numeric references, with and without ";".
    ("https://x.example/?a&#61;1&#x26;b=2", "https://x.example/?a=1&b=2"),
    ("https://x.example/?a=1&#38b=2", "https://x.example/?a=1&b=2"),
    ("https://x.example/?a=&#x20AC;", "https://x.example/?a=%E2%82%AC"),
    ("https://x.example/?a=&#128;", "https://x.example/?a=%E2%82%AC"),  # windows-1252 €
    ("https://x.example/?a=&#x;", "https://x.example/?a=&#x;"),  # no digits: as written
    # What the URL parser trims: C0 controls and spaces at the ends, tabs and newlines
    # anywhere; not U+00A0, which is percent-encoded as UTF-8.
    ("https://x.example/a&nbsp;", "https://x.example/a%C2%A0"),
    ("&nbsp;https://x.example/a", None),  # not absolute any more: a relative link
    (" \n https://x.example/a \t ", "https://x.example/a"),
    ("https://x.example/a\nb\r\nc", "https://x.example/abc"),
    ("https://x.example/a&#10;b&#9;c", "https://x.example/abc"),
    ("&#32;https://x.example/a&#32;", "https://x.example/a"),
    ("https://x.example/a b", "https://x.example/a%20b"),
    ("https://x.example/café?q=é", "https://x.example/caf%C3%A9?q=%C3%A9"),
]


def href_target(raw: str) -> str | None:
    """The target signed for ``<a href="raw">``; None if it was left as is."""
    done = rewrite_html(f'<a href="{raw}">x</a>', BASE, KEYS, "spring", "user-42")
    clicks = re.findall(r'href="(https://t\.example\.com/c/[^"]+)"', done.html)
    assert len(clicks) == done.links and len(done.skipped) == 1 - done.links
    return target_of(clicks[0]) if clicks else None


def test_hrefs_are_decoded_as_a_browser_decodes_attributes() -> None:
    wrong = [(raw, href_target(raw), want) for raw, want in HREFS if href_target(raw) != want]
    assert wrong == []


PLACEHOLDERS = [
    "[[EMAIL_TO]]",  # Mailjet
    "https://x.example/u?e=[[EMAIL_TO]]&l=[[UNSUB_LINK_EN]]",
    "%recipient.email%",  # Mailgun
    "https://x.example/u?e=%recipient.email%",
    "%unsubscribe_url%",
    "%EMAIL%",  # ActiveCampaign
    "https://x.example/?a=%ACCOUNT%",
    "<%asm_group_unsubscribe_raw_url%>",  # SendGrid
    "&lt;%asm_group_unsubscribe_raw_url%&gt;",
    "[Unsubscribe_Preferences]",
    "https://x.example/?e=[Email]",  # Sendy
    "{{ unsubscribe_url }}",  # Handlebars / Liquid
    "https://x.example/?u={{{id}}}",
    "https://x.example/{% if vip %}vip{% endif %}",
    "*|UNSUB|*",  # Mailchimp
    "https://x.example/?e=*|EMAIL|*",
    "${unsubscribe_link}",  # Responsys / FreeMarker
    "https://x.example/?e=%%emailaddr%%",  # Salesforce Marketing Cloud
    "{unsubscribe_url}",  # Mautic
    "https://x.example/?e={$email}",  # MailerLite
]
# Real URLs that only look like merge tags.
NOT_PLACEHOLDERS = [
    "https://x.example/%C3%A9t%C3%A9",  # percent-encoding: "%A9t%" is not a tag
    "https://x.example/100%25",
    "https://x.example/?filter[color]=red&ids[]=1",
    "http://[fe80::1]/status",
    "https://x.example/?json=%7B%22a%22%3A1%7D",
]


def test_merge_tags_of_common_senders_are_reported_as_placeholders_and_left_alone() -> None:
    for href in PLACEHOLDERS:
        document = f'<p><a href="{href}">x</a></p>'
        done = rewrite_html(document, BASE, KEYS, "spring", "user-42")
        assert done.links == 0, href
        (skipped,) = done.skipped
        assert skipped[1].startswith("template placeholder"), (href, skipped)
        assert done.html.startswith(document), href  # the link untouched
    for href in NOT_PLACEHOLDERS:
        assert href_target(href) == href


OUTLOOK = """<body><table><tr><td>
<!--[if mso]>
<v:roundrect xmlns:v="urn:schemas-microsoft-com:vml" href="https://shop.example/sale?a=1&amp;b=2"
  style="height:40px;width:200px" arcsize="10%" fillcolor="#d62828"><w:anchorlock/>
  <center>Shop the sale</center></v:roundrect>
<v:rect href="https://shop.example/outlook-only" style="width:1px"></v:rect>
<v:rect style="width:1px" fillcolor="#000"></v:rect>
<![endif]-->
<!--[if !mso]><!-->
<a href="https://shop.example/sale?a=1&amp;b=2" style="display:inline-block">Shop the sale</a>
<!--<![endif]-->
<!-- <a href="https://shop.example/commented-out">not a conditional comment</a> -->
</td></tr></table></body>"""


def test_outlook_only_buttons_get_the_click_url_of_their_html_twin() -> None:
    done = rewrite_html(OUTLOOK, BASE, KEYS, "spring", "user-42")
    clicks = re.findall(r'href="(https://t\.example\.com/c/[^"]+)"', done.html)
    assert [target_of(c) for c in clicks] == [
        "https://shop.example/sale?a=1&b=2",  # v:roundrect
        "https://shop.example/outlook-only",  # v:rect
        "https://shop.example/sale?a=1&b=2",  # the <a> for every other client
    ]
    assert clicks[0] == clicks[2]  # one target, one click URL, whichever client
    assert '<v:rect style="width:1px" fillcolor="#000"></v:rect>' in done.html
    assert "<!--[if mso]>\n<v:roundrect" in done.html and "<![endif]-->" in done.html
    assert '<a href="https://shop.example/commented-out">' in done.html
    assert done.links == 3 and done.skipped == []


PIXEL = re.compile(r'<div style="height:0;[^"]*"><img src="https://t\.example\.com/o/[^>]+></div>')


def test_the_pixel_goes_in_the_last_cell_before_body_in_a_zero_height_block() -> None:
    cases = {
        # The last </td> before </body>: the outermost cell, which wraps everything.
        "<body><table><tr><td><table><tr><td>footer</td></tr></table>"
        "</td></tr></table></body>": "<body><table><tr><td><table><tr><td>footer</td></tr>"
        "</table>PIXEL</td></tr></table></body>",
        # A cell Outlook never sees (<!--[if !mso]><!-->) is passed over for one it sees.
        "<body><table><tr><td>a</td></tr></table><!--[if !mso]><!--><table><tr><td>b</td>"
        "</tr></table><!--<![endif]--></body>": "<body><table><tr><td>aPIXEL</td></tr>"
        "</table><!--[if !mso]><!--><table><tr><td>b</td></tr></table><!--<![endif]--></body>",
        # Ghost-table cells inside <!--[if mso]> are comments to everyone else.
        "<body><p>hi</p><!--[if mso]><table><tr><td><![endif]--><div>x</div>"
        "<!--[if mso]></td></tr></table><![endif]--></body>": "<body><p>hi</p><!--[if mso]>"
        "<table><tr><td><![endif]--><div>x</div><!--[if mso]></td></tr></table><![endif]-->"
        "PIXEL</body>",
        "<table><tr><td>fragment</td></tr></table>": "<table><tr><td>fragmentPIXEL</td></tr>"
        "</table>",
        "<p>no table</p>": "<p>no table</p>PIXEL",
    }
    for document, expected in cases.items():
        done = rewrite_html(document, BASE, KEYS, "spring", "user-42")
        assert PIXEL.sub("PIXEL", done.html) == expected
        (pixel,) = PIXEL.findall(done.html)
        # Clipped, never hidden: some clients do not fetch an image they will not show.
        assert "overflow:hidden" in pixel and "display:none" not in pixel
        assert "visibility" not in pixel


def test_the_invalid_link_page_fits_a_phone_screen() -> None:
    from ingest.decide import INVALID_LINK_PAGE

    assert '<meta charset="utf-8">' in INVALID_LINK_PAGE
    assert '<meta name="viewport" content="width=device-width,initial-scale=1">' in (
        INVALID_LINK_PAGE
    )
    assert len(INVALID_LINK_PAGE) < 400


def run_rewrite(tmp_path: Path, document: bytes, from_file: bool) -> bytes:
    """``trackbuf rewrite`` as a real process, bytes in and out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKBUF_")}
    env.update(TRACKBUF_SIGNING_KEYS=KEYS_TEXT, TRACKBUF_PUBLIC_URL=BASE)
    env["PYTHONPATH"] = str(ROOT)
    who = ["--campaign", "spring", "--recipient", "user-42"]
    source, tracked = tmp_path / "part.html", tmp_path / "tracked.html"
    if from_file:
        source.write_bytes(document)
        who += ["--input", str(source), "--output", str(tracked)]
    done = subprocess.run([sys.executable, "-m", "commands", "rewrite", *who],
                          input=None if from_file else document, env=env, cwd=ROOT,
                          capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return tracked.read_bytes() if from_file else done.stdout


def test_the_cli_keeps_every_byte_crlf_and_lone_cr_included(tmp_path: Path) -> None:
    part = (
        '<html>\r\n<body>\r\n<p>Caf\u00e9\r<a href="https://shop.example/?a=1&amp;b=2">'
        "buy</a>\n</p>\r\n<table><tr><td>footer\r\n</td></tr></table>\r\n</body>\r\n</html>\r\n"
    ).encode()
    for from_file in (True, False):
        out = run_rewrite(tmp_path, part, from_file)
        (link,) = re.findall(rb'href="(https://t\.example\.com/c/[^"]+)"', out)
        assert target_of(link.decode()) == "https://shop.example/?a=1&b=2"
        pixel = PIXEL.search(out.decode())
        assert pixel is not None
        kept = out.replace(pixel.group().encode(), b"").replace(link, b"LINK")
        assert kept == part.replace(b"https://shop.example/?a=1&amp;b=2", b"LINK"), from_file
