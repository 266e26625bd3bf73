"""Which hosts a click may redirect to: TRACKBUF_REDIRECT_HOSTS.

Off (every host) by default. With a list, a validly signed click whose target's host is
not on it gets the invalid-link page: a leaked signing key, or a sender that signs
whatever URL it is handed, then cannot make this service an open redirect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

# Letters, digits and '-' in dot-separated labels (IDNs in their xn-- form). A target
# host spelled any other way (percent-escapes, '_', ...) is never on the list: browsers
# would decode it to something the list was not written for.
_HOSTNAME = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)*$")


class RedirectHostsError(ValueError):
    """The allowlist cannot be used; the message names the bad entry."""


@dataclass(frozen=True)
class RedirectHosts:
    exact: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".example.com" for an entry "*.example.com"

    @property
    def restricted(self) -> bool:
        return bool(self.exact or self.suffixes)

    @classmethod
    def parse(cls, spec: str) -> RedirectHosts:
        """``host[,*.domain...]``; empty: every host is allowed."""
        exact: set[str] = set()
        suffixes: list[str] = []
        for entry in (e.strip().lower() for e in spec.split(",")):
            if not entry:
                continue
            wildcard = entry.startswith("*.")
            name = entry[2:] if wildcard else entry
            if not _HOSTNAME.match(name):
                raise RedirectHostsError(
                    f"redirect host {entry!r}: expected a host name like shop.example.com or "
                    "*.example.com (no scheme, port or path)"
                )
            if wildcard:
                suffixes.append("." + name)
            else:
                exact.add(name)
        return cls(frozenset(exact), tuple(suffixes))

    def allows(self, url: str) -> bool:
        """Whether a click may go to ``url`` (already a safe absolute http(s) URL).
        ``*.example.com`` matches any host under example.com, not example.com itself."""
        if not self.restricted:
            return True
        try:
            host = urlsplit(url).hostname
        except ValueError:
            return False
        if not host or not _HOSTNAME.match(host):
            return False
        return host in self.exact or host.endswith(self.suffixes)
