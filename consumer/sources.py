"""The field's maintained lists, read from the dated snapshots in ``data/sources/``.

Each snapshot is shipped as package data (``data/sources/README.md`` says where it comes
from, its date and its licence) and read once, when the classifier is built; nothing
is fetched at run time. What each gives the classifier:

- ``named_agents.json``: agents named one by one, with the kind of fetch they are
  (a person through a webmail proxy, or a machine) and their reason; consulted first.
- ``apple_private_relay_egress.csv``: iCloud Private Relay egress ranges (Apple Mail
  Privacy Protection fetches through them). An operator may point the setting
  ``apple_egress_csv`` (``TRACKBUF_APPLE_EGRESS_CSV``) at a newer file downloaded from
  Apple.
- ``microsoft_exchange_online.json``: Exchange Online / Defender for Office 365 ranges.
- ``crawler_user_agents.json`` (MIT) and ``device_detector_bots.json`` (LGPL-3.0, read
  as data): robots, scanners and link previews by agent pattern.

Lookups are built for the consumer's cache misses: address ranges as sorted integer
intervals searched by bisection, agent patterns indexed by a literal each must contain
(``PatternList``).
"""

from __future__ import annotations

import bisect
import csv
import importlib
import ipaddress
import json
import logging
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from trackbuf.log import kv

log = logging.getLogger("trackbuf.consumer.sources")

SOURCES = "data/sources"
# A newer egress file the operator downloaded (TRACKBUF_APPLE_EGRESS_CSV, set through
# consumer.classify.configure); None: the shipped snapshot.
apple_file: str | None = None

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _text(name: str) -> str:
    return resources.files("consumer").joinpath(f"{SOURCES}/{name}").read_text()


class Ranges:
    """A set of address ranges: membership by bisection over sorted intervals."""

    def __init__(self, networks: list[Network]) -> None:
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._ends: dict[int, list[int]] = {4: [], 6: []}
        for version in (4, 6):
            spans = sorted(
                (int(n.network_address), int(n.broadcast_address))
                for n in networks
                if n.version == version
            )
            merged: list[list[int]] = []
            for start, end in spans:
                if merged and start <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            self._starts[version] = [s for s, _ in merged]
            self._ends[version] = [e for _, e in merged]
        self.size = len(networks)

    def __contains__(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        value = int(address)
        starts = self._starts[address.version]
        at = bisect.bisect_right(starts, value) - 1
        return at >= 0 and value <= self._ends[address.version][at]


def apple_egress(text: str) -> Ranges:
    """``CIDR,country,region,city`` lines (a trailing empty column, as Apple serves
    it, is accepted); a line whose first column is not a CIDR is an error."""
    networks: list[Network] = []
    for number, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or not row[0].strip():
            continue
        try:
            networks.append(ipaddress.ip_network(row[0].strip(), strict=False))
        except ValueError:
            raise ValueError(f"egress ranges, line {number}: {row[0]!r} is not a CIDR") from None
    return Ranges(networks)


def microsoft_ranges(doc: dict[str, Any]) -> Ranges:
    return Ranges(
        [
            ipaddress.ip_network(ip, strict=False)
            for e in doc["endpoints"]
            for ip in e.get("ips", [])
        ]
    )


@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern[str]
    reason: str
    literals: tuple[str, ...] = ()  # every match contains one of them (see PatternList)


_parser: Any = importlib.import_module("re._parser")
GRAM = 3  # characters of a required literal the index is keyed by


def required_literals(pattern: str, flags: int = 0) -> list[str]:
    """Strings of which every match contains at least one, read from the pattern's parse
    tree ([] when none is known): a run of literals, or one per alternative of a
    branch; the choice whose shortest string is longest."""
    return _alternatives(_parser.parse(pattern, flags))


def _alternatives(sub: Any) -> list[str]:
    best: list[str] = []
    run = ""
    for op, value in sub:
        if op is _parser.LITERAL:
            run += chr(value)
            found = [run]
        else:
            run = ""
            if op is _parser.BRANCH:
                branches = [_alternatives(b) for b in value[1]]
                found = [x for b in branches for x in b] if all(branches) else []
            elif op is _parser.SUBPATTERN:
                found = _alternatives(value[3])
            else:
                found = []
        if found and (not best or min(map(len, found)) > min(map(len, best))):
            best = found
    return best


@dataclass
class PatternList:
    """Agent patterns of a maintained list, each with the reason a match gives.

    A list is ~1,500 regexes: one combined alternation costs ~3 ms per agent in
    Python's engine. Nearly every pattern needs a literal (``Googlebot/``), or one of a
    few (``a|b``), so they are indexed by its first characters (lower-cased): an
    agent's own 3-character windows pick the few candidates, and only those (and the
    patterns with no such literal) are run, in list order: the same answer for a
    fraction of the work."""

    patterns: list[Pattern]
    _by_gram: dict[str, list[int]] = field(default_factory=dict)
    _always: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for index, pattern in enumerate(self.patterns):
            literals = pattern.literals
            if not literals or min(map(len, literals)) < GRAM:
                self._always.append(index)
                continue
            for literal in literals:
                self._by_gram.setdefault(literal[:GRAM].lower(), []).append(index)

    def match(self, agent: str) -> str | None:
        lowered = agent.lower()
        grams = self._by_gram
        candidates = set(self._always)
        for at in range(len(lowered) - GRAM + 1):
            found = grams.get(lowered[at : at + GRAM])
            if found:
                candidates.update(found)
        for index in sorted(candidates):
            pattern = self.patterns[index]
            if pattern.regex.search(agent):
                return pattern.reason
        return None


def _compiled(pattern: str, flags: int = 0) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern, flags)
    except re.error:
        return None  # written for another regex dialect: skipped (counted in the log)


def crawler_patterns(entries: list[dict[str, Any]], skip: set[str]) -> PatternList:
    """crawler-user-agents: link previews by their tag, the rest robots. ``skip``:
    agents the named list says are a person's (webmail proxies), never a robot here."""
    patterns = []
    for entry in entries:
        regex = _compiled(entry["pattern"])
        if regex is None or any(regex.search(agent) for agent in skip):
            continue
        tags = entry.get("tags", [])
        reason = "link_preview" if "social-preview" in tags else (
            "security_scanner" if "scanner" in tags else "bot")  # fmt: skip
        patterns.append(Pattern(regex, reason, tuple(required_literals(entry["pattern"]))))
    return PatternList(patterns)


# device-detector wraps every regex so that it starts a word (Parser/Bot.php).
_DD_PREFIX = r"(?:^|[^A-Z0-9_-]|[^A-Z0-9-]_|sprd-|MZ-)"


def device_detector_patterns(bots: list[dict[str, Any]], skip: set[str]) -> PatternList:
    patterns = []
    for bot in bots:
        regex = _compiled(_DD_PREFIX + f"(?:{bot['regex']})", re.IGNORECASE)
        if regex is None or any(regex.search(agent) for agent in skip):
            continue
        reason = "security_scanner" if bot.get("category") == "Security Checker" else "bot"
        literals = tuple(required_literals(bot["regex"], re.IGNORECASE))
        patterns.append(Pattern(regex, reason, literals))
    return PatternList(patterns)


@dataclass(frozen=True)
class NamedAgent:
    """One entry of named_agents.json that one request can decide."""

    name: str
    kind: str  # "proxied" or "machine"
    reason: str
    contains: tuple[str, ...]  # case-sensitive substrings
    equals: str | None  # the whole agent, trimmed
    networks: tuple[str, ...]  # "apple", "microsoft" or CIDRs
    purpose_prefetch: bool  # matched by a Purpose / Sec-Purpose: prefetch request
    head: bool  # matched by a HEAD request


def named_agents(doc: dict[str, Any]) -> list[NamedAgent]:
    out = []
    for entry in doc["agents"]:
        match = entry.get("match", {})
        if not match:
            continue  # nothing one request shows: timing only
        networks = []
        for net in match.get("networks", []):
            if net == "apple_private_relay_egress.csv":
                networks.append("apple")
            elif net == "microsoft_exchange_online.json":
                networks.append("microsoft")
            elif _is_cidr(net):
                networks.append(net)
            # Other references ("machine_rules.json: Mimecast") are rules of their own.
        headers = {k.lower() for k in match.get("headers", {})}
        out.append(NamedAgent(
            name=entry["name"], kind=entry["kind"], reason=entry["reason"],
            contains=tuple(match.get("user_agent_contains", [])),
            equals=match.get("user_agent_equals"),
            networks=tuple(networks),
            purpose_prefetch=bool(headers & {"purpose", "sec-purpose"}),
            head="HEAD" in match.get("methods", []),
        ))  # fmt: skip
    return out


def _is_cidr(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


@dataclass
class Sources:
    named: list[NamedAgent]
    apple: Ranges
    microsoft: Ranges
    lists: tuple[PatternList, ...]
    # Extra CIDRs named by entries, parsed once.
    cidrs: dict[str, Network]

    def in_networks(
        self, names: tuple[str, ...], address: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> bool:
        for name in names:
            if name == "apple":
                if address in self.apple:
                    return True
            elif name == "microsoft":
                if address in self.microsoft:
                    return True
            else:
                net = self.cidrs[name]
                if net.version == address.version and address in net:
                    return True
        return False

    def robot(self, agent: str) -> str | None:
        """The reason a maintained list gives this agent, if any lists it."""
        for patterns in self.lists:
            reason = patterns.match(agent)
            if reason is not None:
                return reason
        return None


@cache
def load() -> Sources:
    named = named_agents(json.loads(_text("named_agents.json")))
    # Agents the named list counts as people through a proxy: the maintained robot lists
    # name some of them (GoogleImageProxy, YahooMailProxy...) and must not win.
    people = {c for n in named if n.kind == "proxied" for c in n.contains}
    apple_path = apple_file
    if apple_path:
        with open(apple_path, encoding="utf-8") as handle:
            apple = apple_egress(handle.read())
        log.info(kv("apple_egress_loaded", path=apple_path, ranges=apple.size))
    else:
        apple = apple_egress(_text("apple_private_relay_egress.csv"))
    crawlers = crawler_patterns(json.loads(_text("crawler_user_agents.json")), people)
    detector = device_detector_patterns(
        json.loads(_text("device_detector_bots.json"))["bots"], people
    )
    cidrs = {
        net: ipaddress.ip_network(net, strict=False)
        for n in named
        for net in n.networks
        if net not in ("apple", "microsoft")
    }
    return Sources(
        named=named,
        apple=apple,
        microsoft=microsoft_ranges(json.loads(_text("microsoft_exchange_online.json"))),
        lists=(crawlers, detector),
        cidrs=cidrs,
    )
