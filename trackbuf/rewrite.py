"""Make an email's HTML tracked: links through signed click redirects, plus an open pixel.

Only what tracking needs is changed; every other byte of the HTML is left exactly as it
was (no parse-and-reserialise, which would reformat a carefully built email):

- the ``href`` of each ``<a>`` and ``<area>`` pointing at an absolute http(s) URL becomes
  a click URL for that target;
- links that are not http(s) (``mailto:``, ``tel:``, ``#top``, relative paths, template
  placeholders such as ``{{unsubscribe_url}}``), links already tracked, and links marked
  ``data-trackbuf="off"`` are left alone and reported as skipped; so is a URL that still
  holds a merge tag, as the token would freeze it: rewrite the HTML after rendering it
  for its recipient;
- a 1x1 open pixel goes just before the last ``</body>`` (at the end if there is none).

Comments, ``<script>`` and ``<style>`` are skipped whole. Running it twice changes
nothing the second time.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from trackbuf.links import CLICK_PREFIX, OPEN_PREFIX, click_url, open_url
from trackbuf.tokens import Keyring, LinkError, ascii_url, is_safe_target

# One attribute as an HTML tokenizer reads it: a name, then maybe = and a value that is
# double-quoted, single-quoted, or unquoted up to whitespace or ">" (so "?a=1&b=2" and
# "it's" belong to the value). Possessive quantifiers: no backtracking on a broken tag.
_NAME = r"""[^\s"'>/=]++"""
_VALUE = r""""[^"]*+"|'[^']*+'|[^\s>]++"""
_ATTRIBUTE = rf"""{_NAME}(?:\s*+=\s*+(?:{_VALUE}))?"""
_TAG_REST = rf"""(?=[\s/>])(?:\s*+(?:{_ATTRIBUTE}|/))*+\s*+>"""
# One pass over the document finds what matters and steps over what must not be touched.
_SCAN = re.compile(
    rf"""(?P<comment><!--.*?-->)
      | (?P<raw><(?P<rawtag>script|style)\b.*?</(?P=rawtag)\s*>)
      | (?P<link><(?:a|area){_TAG_REST})
      | (?P<img><img{_TAG_REST})
      | (?P<body></body\s*>)""",
    re.IGNORECASE | re.DOTALL | re.VERBOSE,
)
_ATTR = re.compile(rf"""(?P<name>{_NAME})(?:\s*+=\s*+(?P<value>{_VALUE}))?""")
_TAG_NAME = re.compile(r"<\w+")
OPT_OUT = "data-trackbuf"
# Merge tags of common template languages (Jinja/Handlebars/Liquid, Mailchimp, others).
TEMPLATE_MARKERS = ("{{", "{%", "*|", "%%")


@dataclass
class Rewritten:
    html: str
    links: int = 0  # rewritten to click URLs
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (href, why)
    pixel_added: bool = False


def rewrite_html(
    document: str, public_url: str, keyring: Keyring, campaign: str, recipient: str
) -> Rewritten:
    base = public_url.rstrip("/")
    result = Rewritten(html="")
    out: list[str] = []
    at = 0
    body_close: int | None = None  # index in `out` of the last </body>
    has_pixel = False
    for match in _SCAN.finditer(document):
        out.append(document[at : match.start()])
        at = match.end()
        kind = match.lastgroup
        if kind == "link":
            out.append(_rewrite_link(match.group(), base, keyring, campaign, recipient, result))
            continue
        if kind == "img":
            src = _attribute(match.group(), "src")
            has_pixel = has_pixel or (src is not None and src[1].startswith(base + OPEN_PREFIX))
        elif kind == "body":
            body_close = len(out)
        out.append(match.group())
    out.append(document[at:])
    if not has_pixel:
        pixel = _pixel_tag(open_url(base, keyring, campaign, recipient))
        if body_close is None:
            out.append(pixel)
        else:
            out.insert(body_close, pixel)
        result.pixel_added = True
    result.html = "".join(out)
    return result


def _rewrite_link(
    tag: str, base: str, keyring: Keyring, campaign: str, recipient: str, result: Rewritten
) -> str:
    href = _attribute(tag, "href")
    if href is None:
        return tag  # a named anchor, <a name="top">
    span, target = href
    opt_out = _attribute(tag, OPT_OUT)
    if opt_out is not None and opt_out[1].lower() in ("off", "false", "no"):
        result.skipped.append((target, f"{OPT_OUT}={opt_out[1]}"))
        return tag
    if target.startswith(base + CLICK_PREFIX):
        result.skipped.append((target, "already tracked"))
        return tag
    if not is_safe_target(ascii_url(target)):
        result.skipped.append((target, "not an absolute http(s) URL"))
        return tag
    if any(marker in target for marker in TEMPLATE_MARKERS):
        # Signed into a token, the placeholder could never be filled in any more.
        result.skipped.append((target, "holds a template placeholder: rewrite rendered HTML"))
        return tag
    try:
        tracked = click_url(base, keyring, campaign, recipient, target)
    except LinkError as exc:  # e.g. a target too long for a token
        result.skipped.append((target, str(exc)))
        return tag
    result.links += 1
    return f'{tag[: span[0]]}"{html.escape(tracked, quote=True)}"{tag[span[1] :]}'


def _attribute(tag: str, name: str) -> tuple[tuple[int, int], str] | None:
    """The span of an attribute's raw value in ``tag`` and the value as a browser reads
    it (entities decoded, surrounding whitespace dropped); None if it is absent."""
    name_end = _TAG_NAME.match(tag)
    for attr in _ATTR.finditer(tag, name_end.end() if name_end else 0):
        if attr.group("name").lower() != name:
            continue
        raw = attr.group("value")
        if raw is None:
            return (attr.end(), attr.end()), ""
        inner = raw[1:-1] if raw[0] in "\"'" else raw
        return attr.span("value"), html.unescape(inner).strip()
    return None


def _pixel_tag(url: str) -> str:
    # Not display:none: some clients skip fetching images they will not show.
    return (
        f'<img src="{html.escape(url, quote=True)}" width="1" height="1" alt="" '
        'style="display:block;border:0;width:1px;height:1px;" />'
    )
