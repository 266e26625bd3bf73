"""Merge tags: the placeholders an email service fills in per recipient when it sends.

A link that still holds one must not be signed into a click token: the service could
no longer fill it in, and every recipient would be sent to the same literal text. The
syntaxes below are those the common services document for links (see docs/REWRITE.md).
"""

from __future__ import annotations

import re

# (what it is, pattern), matched against the href as a browser reads it.
_SYNTAXES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # {{ name }}, {{{ name }}}, {% tag %}: Handlebars, Mustache, Liquid, Jinja, Twig
    # (SendGrid dynamic templates, Mailjet {{var:name}}, Postmark, Customer.io, Braze,
    # Klaviyo, HubSpot, Brevo, Amazon SES).
    ("Handlebars/Liquid {{ }}", re.compile(r"\{\{")),
    ("Liquid/Jinja {% %}", re.compile(r"\{%")),
    ("Mailchimp *|TAG|*", re.compile(r"\*\|[^|]*\|\*")),
    # Salesforce Marketing Cloud %%field%% and %%=AMPscript=%%, Pardot %%unsubscribe%%.
    ("Salesforce %%field%%", re.compile(r"%%[^%]+%%")),
    # Mailjet's [[EMAIL_TO]], [[UNSUB_LINK_EN]], [[var:name]].
    ("Mailjet [[TAG]]", re.compile(r"\[\[[^\[\]]+\]\]")),
    # SendGrid's <%asm_group_unsubscribe_raw_url%>, ERB/ASP-style <%= field %>.
    ("SendGrid <%tag%>", re.compile(r"<%.*?%>", re.DOTALL)),
    # Responsys, FreeMarker and Velocity ${field}.
    ("${field}", re.compile(r"\$\{[^}]*\}")),
    # [Unsubscribe], [Unsubscribe_Preferences], [Weblink] (SendGrid legacy), Sendy's
    # [unsubscribe], Campaign Monitor's [firstname,fallback=]. Not after a word, "/",
    # "@" or a bracket: PHP-style ?filter[color]= and IPv6 hosts [fe80::1] are URLs.
    ("[Tag]", re.compile(r"(?<![\w\]\[/@])\[[A-Za-z][\w.:-]*(?:,[^\]]*)?\](?!\])")),
    # Mautic's {unsubscribe_url}, MailerLite's {$unsubscribe}.
    ("{field}", re.compile(r"\{\$?[A-Za-z_][\w.:=|-]*\}")),
)
# Mailgun's %recipient.email% and %unsubscribe_url%, ActiveCampaign's %EMAIL% and
# %UNSUBSCRIBELINK%. Percent-encoding looks alike (%C3%A9t%C3%A9 has "%A9t%"), so a
# span counts only when one of its two "%" does not start a valid %XX escape.
_PERCENT_TAG = re.compile(r"%(?=[A-Za-z_])[\w.:-]+(?=%)")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def placeholder_in(href: str) -> str | None:
    """The kind of merge tag ``href`` holds, or None if it holds none."""
    for kind, pattern in _SYNTAXES:
        if pattern.search(href):
            return kind
    for tag in _PERCENT_TAG.finditer(href):
        if not (_ESCAPE.match(href, tag.start()) and _ESCAPE.match(href, tag.end())):
            return "Mailgun/ActiveCampaign %field%"
    return None
