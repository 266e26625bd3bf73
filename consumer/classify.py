"""Is this fetch a person reading, or a machine? And which mail client or browser?

Every stored event is classified once, by the consumer before its insert, from its
user agent and address against ``consumer/data/machine_rules.json`` (versioned, shipped
with the package, never fetched at run time). Nothing is ever dropped: a machine event
is stored like any other, with ``machine`` set and the rule that matched in
``machine_reason``. What cannot be told is a person.

The timing rule (``burst_clicks``: one recipient clicking several links of a campaign
within seconds) needs other events, so it runs in the database as part of the insert;
its parameters come from the same file (``Rules.burst``).

Client families come from ua-parser (the maintained uap-core regexes), not from
patterns of our own. Parsing costs ~70 us per new user agent with the native
accelerator; real traffic has few distinct agents, so verdicts are cached per agent.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from typing import Any

import ua_parser

from consumer import sources
from consumer.sources import NamedAgent, Sources
from consumer.sources import load as load_sources

# What ua-parser names an agent it does not know, and what we store for no agent.
UNKNOWN_CLIENT = "Other"
REASONS = (
    "apple_mpp",
    "google_image_proxy",
    "yahoo_proxy",
    "other_webmail_proxy",
    "microsoft_prefetch",
    "security_scanner",
    "link_preview",
    "prefetch",
    "burst_clicks",
    "bot",
)
_CACHE = 4096  # distinct user agents (or addresses) remembered


# The three kinds of fetch (docs/ANALYTICS.md): a person, a person through a proxy
# (the open is real; device and address are the proxy's), a machine.
PERSON, PROXIED, MACHINE = "person", "proxied", "machine"


@dataclass(frozen=True, slots=True)
class Verdict:
    """``reason`` is None for a person (direct or proxied); ``client`` is the mail
    client or browser; ``proxy`` names the proxy a person's fetch came through."""

    reason: str | None
    client: str
    proxy: str | None = None

    @property
    def machine(self) -> bool:
        return self.reason is not None

    @property
    def kind(self) -> str:
        if self.reason is not None:
            return MACHINE
        return PERSON if self.proxy is None else PROXIED


@dataclass(frozen=True)
class AgentRule:
    reason: str
    contains: tuple[str, ...]  # lower-cased
    # "proxied": a person's fetch through this proxy; "machine": no person.
    kind: str = MACHINE


@dataclass(frozen=True)
class NetworkRule:
    reason: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    # When set, the rule applies only to this exact user agent (Apple's proxy sends a
    # bare "Mozilla/5.0"; Apple staff reading mail from 17/8 with Safari are people).
    user_agent_is: str | None


@dataclass(frozen=True)
class Burst:
    reason: str
    min_links: int
    window_seconds: float


@dataclass(frozen=True)
class Rules:
    version: str
    agents: tuple[AgentRule, ...]
    networks: tuple[NetworkRule, ...]
    bot_devices: frozenset[str]
    bot_clients: frozenset[str]
    bot_contains: tuple[str, ...]
    burst: Burst

    @classmethod
    def parse(cls, doc: dict[str, Any]) -> Rules:
        for section in ("version", "user_agents", "networks", "bots", "timing"):
            if section not in doc:
                raise ValueError(f"machine rules: missing {section!r}")
        agents = tuple(
            AgentRule(
                _reason(a["reason"]),
                tuple(s.lower() for s in a["contains"]),
                _kind(a.get("kind", MACHINE)),
            )
            for a in doc["user_agents"]
        )
        networks = tuple(
            NetworkRule(
                _reason(n["reason"]),
                tuple(ipaddress.ip_network(c) for c in n["cidrs"]),
                n.get("user_agent_is"),
            )
            for n in doc["networks"]
        )
        bots = doc["bots"]
        burst = doc["timing"]["burst_clicks"]
        return cls(
            version=str(doc["version"]),
            agents=agents,
            networks=networks,
            bot_devices=frozenset(bots["device_families"]),
            bot_clients=frozenset(bots["client_families"]),
            bot_contains=tuple(s.lower() for s in bots["contains"]),
            burst=Burst(
                _reason(burst["reason"]), int(burst["min_links"]), float(burst["window_seconds"])
            ),
        )


def _kind(value: str) -> str:
    if value not in (PROXIED, MACHINE):
        raise ValueError(f"machine rules: kind {value!r} is neither proxied nor machine")
    return value


def _reason(value: str) -> str:
    if value not in REASONS:
        raise ValueError(f"machine rules: unknown reason {value!r}")
    return value


@cache
def rules() -> Rules:
    text = resources.files("consumer").joinpath("data/machine_rules.json").read_text()
    return Rules.parse(json.loads(text))


class Classifier:
    """Verdicts for (user agent, address) pairs, cached per agent and per address."""

    def __init__(self, rules: Rules, sources: Sources | None = None) -> None:
        self.rules = rules
        self.sources = sources if sources is not None else load_sources()
        # Named agents one request decides by its agent alone, and by agent and address.
        self.named_by_agent = [
            n for n in self.sources.named
            if (n.contains or n.equals is not None) and not n.networks
            and not n.purpose_prefetch and not n.head
        ]  # fmt: skip
        self.named_by_address = [n for n in self.sources.named if n.networks]
        self.by_agent = lru_cache(maxsize=_CACHE)(self._by_agent)
        self.by_address = lru_cache(maxsize=_CACHE)(self._by_address)
        self.pair = lru_cache(maxsize=_CACHE * 4)(self._pair)
        # Consumer threads share one classifier; ua-parser's own cache is not
        # documented as thread-safe, so a miss parses under a lock (hits never get here).
        self._parse_lock = threading.Lock()

    def classify(self, user_agent: str | None, ip: str | None) -> Verdict:
        return Verdict(*self.pair(user_agent, ip))

    def _pair(self, user_agent: str | None, ip: str | None) -> tuple[str | None, str, str | None]:
        """(reason, client, proxy): what ``classify`` says, as a bare tuple, cached per
        pair (the consumer's hot path: one cache lookup per event). ``user_agent`` None
        means ingest did not keep it (TRACKBUF_USER_AGENT_MODE=drop, or a row stored
        before empty agents were kept as ""): only rules that need no agent apply; ""
        means the request sent none, which the agent rules judge."""
        if user_agent is None:
            return self._agent_unknown(ip)
        agent = user_agent
        reason, bot, client, proxy = self.by_agent(agent)
        if proxy is not None:
            return None, client, proxy  # a person, through a named proxy
        if reason is None and ip:
            rules, named = self.by_address(ip)
            for rule in rules:
                if rule.user_agent_is is None or rule.user_agent_is == agent:
                    reason = rule.reason
                    break
            for entry in named:
                if reason is None and (entry.equals is None or entry.equals == agent.strip()):
                    reason = entry.reason
        return reason or bot, client, None

    def _agent_unknown(self, ip: str | None) -> tuple[str | None, str, str | None]:
        """The verdict without an agent to read: the address rules that ask for none
        (an agent-specific one, such as Apple's bare ``Mozilla/5.0``, cannot be told);
        else a person, as anything that cannot be told is."""
        if ip:
            rules, named = self.by_address(ip)
            for rule in rules:
                if rule.user_agent_is is None:
                    return rule.reason, UNKNOWN_CLIENT, None
            for entry in named:
                if entry.equals is None:
                    return entry.reason, UNKNOWN_CLIENT, None
        return None, UNKNOWN_CLIENT, None

    def _by_agent(self, user_agent: str) -> tuple[str | None, str | None, str, str | None]:
        """What the agent alone says: a named fetcher's reason, ``bot`` for a generic
        robot or script (tried after the address rules), its client family, and the
        proxy a person's fetch came through."""
        for entry in self.named_by_agent:
            if (entry.equals is not None and user_agent.strip() == entry.equals) or any(
                token in user_agent for token in entry.contains
            ):
                if entry.kind == PROXIED:
                    return None, None, _family(self, user_agent), entry.reason
                return entry.reason, None, _family(self, user_agent), None
        if not user_agent:
            return None, None, UNKNOWN_CLIENT, None
        with self._parse_lock:
            parsed = ua_parser.parse(user_agent)
        client = parsed.user_agent.family if parsed.user_agent else UNKNOWN_CLIENT
        device = parsed.device.family if parsed.device else None
        lowered = user_agent.lower()
        for rule in self.rules.agents:
            if any(token in lowered for token in rule.contains):
                if rule.kind == PROXIED:
                    return None, None, client, rule.reason
                return rule.reason, None, client, None
        listed = self.sources.robot(user_agent)
        if listed is not None:
            return None, listed, client, None
        robot = (
            device in self.rules.bot_devices
            or client in self.rules.bot_clients
            or any(token in lowered for token in self.rules.bot_contains)
        )
        return None, ("bot" if robot else None), client, None

    def _by_address(self, ip: str) -> tuple[tuple[NetworkRule, ...], tuple[NamedAgent, ...]]:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return (), ()  # the database refuses it; classification has no say
        rules = tuple(
            rule
            for rule in self.rules.networks
            if any(address.version == net.version and address in net for net in rule.networks)
        )
        named = tuple(
            n for n in self.named_by_address if self.sources.in_networks(n.networks, address)
        )
        return rules, named


def _family(judge: Classifier, user_agent: str) -> str:
    """The client family ua-parser names (what a named agent's rows keep as client)."""
    if not user_agent:
        return UNKNOWN_CLIENT
    with judge._parse_lock:
        parsed = ua_parser.parse(user_agent)
    return parsed.user_agent.family if parsed.user_agent else UNKNOWN_CLIENT


@cache
def classifier() -> Classifier:
    return Classifier(rules())


def configure(apple_egress_csv: str) -> None:
    """Use this egress file (a newer download; empty: the shipped snapshot) from the
    next classifier built: called by the consumer and by rebuild before their first."""
    wanted = apple_egress_csv or None
    if wanted != sources.apple_file:
        sources.apple_file = wanted
        load_sources.cache_clear()
        classifier.cache_clear()
