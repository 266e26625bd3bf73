"""Make an email's HTML tracked: links through signed click redirects, plus an open pixel.

Only what tracking needs is changed; every other byte of the HTML is left exactly as it
was (no parse-and-reserialise, which would reformat a carefully built email):

- the ``href`` of each ``<a>`` and ``<area>`` pointing at an absolute http(s) URL becomes
  a click URL for that target, the URL a browser would follow (attribute decoded as the
  HTML standard says, then trimmed as the URL parser does: see trackbuf.htmlurl);
- so does that of Outlook's VML buttons (``<v:roundrect href=...>``) inside
  ``<!--[if mso]>`` conditional comments: the same target gets the same click URL as
  its HTML twin, so Outlook desktop clicks count too;
- links that are not http(s) (``mailto:``, ``tel:``, ``#top``, relative paths), links
  already tracked, links marked ``data-trackbuf="off"`` and links holding a merge tag
  (``{{unsubscribe_url}}``, ``%recipient.email%``, see trackbuf.placeholders: signed
  into a token it could never be filled in) are left alone and reported as skipped;
- a 1x1 open pixel goes at the end of the last table cell before ``</body>`` (see
  ``_pixel_tag`` for why there), else before ``</body>``, else at the end.

Other comments, ``<script>`` and ``<style>`` are skipped whole. Running it twice changes
nothing the second time.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from trackbuf.htmlurl import decode_attribute, percent_encoded, url_of_href
from trackbuf.links import CLICK_PREFIX, OPEN_PREFIX, click_url, open_url
from trackbuf.placeholders import placeholder_in
from trackbuf.tokens import Keyring, LinkError, is_safe_target

# One attribute as an HTML tokenizer reads it: a name, then maybe = and a value that is
# double-quoted, single-quoted, or unquoted up to whitespace or ">" (so "?a=1&b=2" and
# "it's" belong to the value). Possessive quantifiers: no backtracking on a broken tag.
_NAME = r"""[^\s"'>/=]++"""
_VALUE = r""""[^"]*+"|'[^']*+'|[^\s>]++"""
_ATTRIBUTE = rf"""{_NAME}(?:\s*+=\s*+(?:{_VALUE}))?"""
_TAG_REST = rf"""(?=[\s/>])(?:\s*+(?:{_ATTRIBUTE}|/))*+\s*+>"""
# One pass over the document finds what matters and steps over what must not be touched.
# Link tags: <a>, <area>, and VML shapes (v:roundrect, v:rect, v:oval...), which only
# Outlook renders and which may carry an href.
_SCAN = re.compile(
    rf"""(?P<comment><!--.*?-->)
      | (?P<raw><(?P<rawtag>script|style)\b.*?</(?P=rawtag)\s*>)
      | (?P<link><(?:a|area|v:\w+){_TAG_REST})
      | (?P<img><img{_TAG_REST})
      | (?P<cell></td\s*>)
      | (?P<body></body\s*>)""",
    re.IGNORECASE | re.DOTALL | re.VERBOSE,
)
# <!--[if mso]> ... <![endif]-->: a comment to browsers, HTML to the Outlooks it names.
# (The "downlevel-revealed" <!--[if !mso]><!--> ... <!--<![endif]--> needs nothing: its
# content is outside any comment already.)
_CONDITIONAL = re.compile(
    r"(?P<open><!--\[if[^\]]*\]>)(?P<inner>.*)(?P<close><!\[endif\]-->)\Z",
    re.IGNORECASE | re.DOTALL,
)
# <!--[if !mso]><!--> ... <!--<![endif]-->: HTML that the Outlooks named never see.
_REVEALED_OPEN = re.compile(r"<!--\[if[^\]]*\]>\s*<!(?:--\s*)?-->", re.IGNORECASE)
_REVEALED_CLOSE = re.compile(r"<!--\s*<!\[endif\]-->", re.IGNORECASE)
_ATTR = re.compile(rf"""(?P<name>{_NAME})(?:\s*+=\s*+(?P<value>{_VALUE}))?""")
_TAG_NAME = re.compile(r"<[\w:]+")
OPT_OUT = "data-trackbuf"


@dataclass
class Rewritten:
    html: str
    links: int = 0  # rewritten to click URLs
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (href, why)
    pixel_added: bool = False


@dataclass
class _Sender:
    base: str
    keyring: Keyring
    campaign: str
    recipient: str


def rewrite_html(
    document: str, public_url: str, keyring: Keyring, campaign: str, recipient: str
) -> Rewritten:
    sender = _Sender(public_url.rstrip("/"), keyring, campaign, recipient)
    result = Rewritten(html="")
    out: list[str] = []
    at = 0
    last_cell: int | None = None  # index in `out` of the latest </td>
    body_close: int | None = None  # index in `out` of the last </body>
    cell_in_body: int | None = None  # the latest </td> before that </body>
    has_pixel = False
    hidden_from_outlook = 0  # depth of <!--[if !mso]><!--> regions around this point
    for match in _SCAN.finditer(document):
        out.append(document[at : match.start()])
        at = match.end()
        kind = match.lastgroup
        if kind == "link":
            out.append(_rewrite_link(match.group(), sender, result))
            continue
        if kind == "comment":
            comment = match.group()
            if _REVEALED_OPEN.fullmatch(comment):
                hidden_from_outlook += 1
            elif _REVEALED_CLOSE.fullmatch(comment):
                hidden_from_outlook = max(0, hidden_from_outlook - 1)
            out.append(_rewrite_conditional(comment, sender, result))
            continue
        if kind == "img":
            src = _attribute(match.group(), "src")
            has_pixel = has_pixel or (
                src is not None and src[1].startswith(sender.base + OPEN_PREFIX)
            )
        elif kind == "cell" and not hidden_from_outlook:
            last_cell = len(out)  # a pixel there would be lost to Outlook otherwise
        elif kind == "body":
            body_close, cell_in_body = len(out), last_cell
        out.append(match.group())
    out.append(document[at:])
    if not has_pixel:
        pixel = _pixel_tag(open_url(sender.base, keyring, campaign, recipient))
        where = cell_in_body if body_close is not None else last_cell
        where = where if where is not None else body_close
        if where is None:
            out.append(pixel)
        else:
            out.insert(where, pixel)
        result.pixel_added = True
    result.html = "".join(out)
    return result


def _rewrite_conditional(comment: str, sender: _Sender, result: Rewritten) -> str:
    """A conditional comment with its links tracked; any other comment as it was."""
    conditional = _CONDITIONAL.match(comment)
    if conditional is None:
        return comment
    out: list[str] = [conditional["open"]]
    inner = conditional["inner"]
    at = 0
    for match in _SCAN.finditer(inner):
        out.append(inner[at : match.start()])
        at = match.end()
        tag = match.group()
        out.append(_rewrite_link(tag, sender, result) if match.lastgroup == "link" else tag)
    out.append(inner[at:])
    out.append(conditional["close"])
    return "".join(out)


def _rewrite_link(tag: str, sender: _Sender, result: Rewritten) -> str:
    href = _attribute(tag, "href")
    if href is None:
        return tag  # a named anchor, <a name="top">; a VML shape that is no link
    span, target = href
    opt_out = _attribute(tag, OPT_OUT)
    if opt_out is not None and opt_out[1].lower() in ("off", "false", "no"):
        result.skipped.append((target, f"{OPT_OUT}={opt_out[1]}"))
        return tag
    if target.startswith(sender.base + CLICK_PREFIX):
        result.skipped.append((target, "already tracked"))
        return tag
    placeholder = placeholder_in(target)
    if placeholder is not None:
        # Signed into a token, the placeholder could never be filled in any more.
        result.skipped.append(
            (target, f"template placeholder, {placeholder}: rewrite the rendered HTML")
        )
        return tag
    url = percent_encoded(target)
    if not is_safe_target(url):
        result.skipped.append((target, "not an absolute http(s) URL"))
        return tag
    try:
        tracked = click_url(sender.base, sender.keyring, sender.campaign, sender.recipient, url)
    except LinkError as exc:  # e.g. a target too long for a token
        result.skipped.append((target, str(exc)))
        return tag
    result.links += 1
    return f'{tag[: span[0]]}"{html.escape(tracked, quote=True)}"{tag[span[1] :]}'


def _attribute(tag: str, name: str) -> tuple[tuple[int, int], str] | None:
    """The span of an attribute's raw value in ``tag`` and the value as a browser reads
    it (decoded, and for a URL trimmed as the URL parser trims it); None if absent."""
    name_end = _TAG_NAME.match(tag)
    for attr in _ATTR.finditer(tag, name_end.end() if name_end else 0):
        if attr.group("name").lower() != name:
            continue
        raw = attr.group("value")
        if raw is None:
            return (attr.end(), attr.end()), ""
        inner = raw[1:-1] if raw[0] in "\"'" else raw
        return attr.span("value"), url_of_href(decode_attribute(inner))
    return None


def _pixel_tag(url: str) -> str:
    """The open pixel, made to add no visible height anywhere.

    A bare 1x1 image at the end of <body> adds a 1px line below the email, which shows
    the page background as a hairline under a dark footer. So it goes inside the last
    table cell (its own background paints any space it takes, as ESPs that append their
    pixel there rely on), wrapped in a block of zero height that clips it: browsers and
    webmail show nothing, and Outlook desktop (Word), which ignores that CSS, shows one
    row of the cell's own colour. Not display:none nor visibility:hidden: some clients
    skip fetching images they will not show, and a clipped image is still laid out, so
    it is fetched like any other."""
    return (
        '<div style="height:0;max-height:0;overflow:hidden;line-height:0;font-size:0">'
        f'<img src="{html.escape(url, quote=True)}" width="1" height="1" alt="" border="0" '
        'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0" /></div>'
    )
