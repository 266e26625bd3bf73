"""An ``href`` as a browser reads it: the HTML attribute value decoded, then the steps
of the WHATWG URL parser that change which URL is meant.

Python's ``html.unescape`` decodes text content, not attribute values: it turns the
raw ``&`` of ``?id=1&region=us`` into ``®ion=us``, a URL the sender never wrote. The
HTML standard keeps such legacy references (``&reg``, ``&sect``, ``&times``, ``&copy``,
``&not``, ``&curren``, ``&para`` ...) as they are inside an attribute when no ``;``
ends them and a letter, digit or ``=`` follows, "for historical reasons"
(https://html.spec.whatwg.org/multipage/parsing.html#named-character-reference-state).
"""

from __future__ import annotations

import re
from html.entities import html5
from urllib.parse import quote

# html5 holds every name the tokenizer knows, with its ";" and, for the legacy ones,
# also without: "amp;" and "amp", "notin;" but no "notin".
_LONGEST_NAME = max(len(name) for name in html5)
_NAME_RUN = re.compile(r"[A-Za-z0-9]*;?")
_NUMERIC = re.compile(r"#(?:[xX](?P<hex>[0-9A-Fa-f]+)|(?P<dec>[0-9]+));?")
_ALNUM_OR_EQUALS = re.compile(r"[A-Za-z0-9=]")
_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)
_C1 = range(0x80, 0xA0)


def decode_attribute(raw: str) -> str:
    """The value of an attribute as the HTML tokenizer produces it from its source text
    (without the quotes): character references decoded by the attribute-value rules."""
    if "&" not in raw:
        return raw
    out: list[str] = []
    at = 0
    while (amp := raw.find("&", at)) != -1:
        out.append(raw[at:amp])
        text, at = _reference(raw, amp + 1)
        out.append(text)
    out.append(raw[at:])
    return "".join(out)


def _reference(raw: str, at: int) -> tuple[str, int]:
    """What the ``&`` just before ``at`` stands for, and where reading goes on."""
    numeric = _NUMERIC.match(raw, at)
    if numeric:
        digits, base = (numeric["hex"], 16) if numeric["hex"] else (numeric["dec"], 10)
        return _code_point(digits, base), numeric.end()
    run = _NAME_RUN.match(raw, at, at + _LONGEST_NAME).group()  # type: ignore[union-attr]
    # The longest name in the table that the text starts with.
    for size in range(len(run), 0, -1):
        name = run[:size]
        if name in html5:
            end = at + size
            if not name.endswith(";") and _ALNUM_OR_EQUALS.match(raw, end):
                return "&", at  # the historical attribute rule: left as written
            return html5[name], end
    return "&", at  # no such name: a plain ampersand


def _code_point(digits: str, base: int) -> str:
    digits = digits.lstrip("0") or "0"
    if len(digits) > 8:  # beyond U+10FFFF whatever the digits; spares int() a huge string
        return "\ufffd"
    number = int(digits, base)
    if number == 0 or number > _MAX_CODE_POINT or number in _SURROGATES:
        return "\ufffd"
    if number in _C1:
        # The standard maps these as windows-1252 does; its five holes stay as they are.
        try:
            return bytes([number]).decode("cp1252")
        except UnicodeDecodeError:
            return chr(number)
    return chr(number)


# The URL parser's first steps: leading and trailing "C0 control or space" go, and every
# ASCII tab or newline goes wherever it is. Nothing else is trimmed: a U+00A0 from a
# trailing &nbsp; stays and is sent percent-encoded as %C2%A0.
_C0_OR_SPACE = "".join(chr(c) for c in range(0x21))
_TAB_OR_NEWLINE = re.compile(r"[\t\n\r]")
# What the URL parser percent-encodes in every component it keeps text in (path, query,
# fragment): C0 controls, space, DEL and everything beyond ASCII, as UTF-8.
_ALWAYS_ENCODED = re.compile(r"[\x00-\x20\x7f-\U0010ffff]+")


def url_of_href(href: str) -> str:
    """The URL text a browser parses for a decoded ``href`` value."""
    return _TAB_OR_NEWLINE.sub("", href.strip(_C0_OR_SPACE))


def percent_encoded(url: str) -> str:
    """``url`` with what the URL parser would percent-encode already encoded, so the
    text fits a Location header and the browser lands on the same URL.

    A non-ASCII host encoded this way still works: the host parser percent-decodes it
    before turning it into its IDNA (``xn--``) form."""
    return _ALWAYS_ENCODED.sub(lambda run: quote(run.group(), safe=""), url)
