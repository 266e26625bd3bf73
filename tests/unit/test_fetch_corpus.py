"""The labelled fetch corpus (tests/data/fetch_corpus.csv) and the source snapshots the
classifier reads (consumer/data/sources/) are well formed: every row can be replayed and
every range parses. What the classifier makes of them is tested elsewhere."""

from __future__ import annotations

import csv
import ipaddress
import json
import re
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "fetch_corpus.csv"
SOURCES = ROOT / "consumer" / "data" / "sources"

COLUMNS = ["user_agent", "ip", "method", "headers", "expected", "reason", "source"]
MACHINE_REASONS = {
    "apple_mpp",
    "microsoft_prefetch",
    "security_scanner",
    "link_preview",
    "prefetch",
    "bot",
    "",  # a machine that one request cannot tell from a person
}
PROXIES = {"google_image_proxy", "yahoo_proxy", "other_webmail_proxy"}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# RFC 1918, loopback, link-local, unique-local: never where a proxy or scanner sends from.
PRIVATE = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)


def rows() -> list[dict[str, str]]:
    with CORPUS.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@cache
def apple_egress() -> tuple[Network, ...]:
    with (SOURCES / "apple_private_relay_egress.csv").open(newline="", encoding="utf-8") as f:
        return tuple(ipaddress.ip_network(line[0]) for line in csv.reader(f))


@cache
def exchange_online() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (SOURCES / "microsoft_exchange_online.json").read_text(encoding="utf-8")
    )
    return data


def inside(ip: str, networks: tuple[Network, ...] | list[Network]) -> bool:
    address = ipaddress.ip_address(ip)
    return any(address in net for net in networks)


def test_corpus_has_the_columns_and_enough_rows() -> None:
    with CORPUS.open(newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == COLUMNS
    assert len(rows()) >= 150


def test_every_row_is_labelled_with_an_allowed_kind_and_reason() -> None:
    for n, row in enumerate(rows(), start=2):
        kind, reason = row["expected"], row["reason"]
        if kind == "person":
            assert reason == "", f"line {n}: a person has no reason"
        elif kind == "proxied":
            assert reason in PROXIES, f"line {n}: proxied reason {reason!r}"
        elif kind == "machine":
            assert reason in MACHINE_REASONS, f"line {n}: machine reason {reason!r}"
        else:
            pytest.fail(f"line {n}: expected {kind!r}")


def test_every_row_can_be_replayed() -> None:
    for n, row in enumerate(rows(), start=2):
        assert row["method"] in ("GET", "HEAD"), f"line {n}"
        ipaddress.ip_address(row["ip"])  # raises on a malformed address
        headers = json.loads(row["headers"])
        assert isinstance(headers, dict), f"line {n}: headers is not a JSON object"
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        assert row["source"].strip(), f"line {n} names no source"
        assert "\n" not in row["user_agent"]


def test_proxied_and_machine_rows_never_come_from_private_addresses() -> None:
    # A proxy or a scanner is somebody's server. The exceptions use documentation
    # addresses on purpose: machines that run on the reader's own device (an iMessage
    # preview, a browser's prefetch) send from a home or mobile address like a person.
    for n, row in enumerate(rows(), start=2):
        if row["expected"] != "person":
            assert not inside(row["ip"], PRIVATE), f"line {n}: {row['ip']}"


def test_corpus_covers_every_category() -> None:
    seen = Counter((r["expected"], r["reason"]) for r in rows())
    for key in [("person", ""), ("machine", "")]:
        assert seen[key] >= 10, key
    for reason in PROXIES:
        assert seen["proxied", reason] >= 3, reason
    for reason in MACHINE_REASONS - {""}:
        assert seen["machine", reason] >= 8, reason
    shapes = rows()
    assert any(r["method"] == "HEAD" for r in shapes)
    assert any(r["user_agent"] == "" for r in shapes)
    assert any("Sec-Purpose" in json.loads(r["headers"]) for r in shapes)
    assert any("Purpose" in json.loads(r["headers"]) for r in shapes)
    assert any(ipaddress.ip_address(r["ip"]).version == 6 for r in shapes)


def test_apple_mpp_rows_come_from_apple_relay_or_apple_addresses() -> None:
    apple = (*apple_egress(), ipaddress.ip_network("17.0.0.0/8"))
    mpp = [r for r in rows() if r["reason"] == "apple_mpp"]
    assert mpp
    for row in mpp:
        assert row["user_agent"] == "Mozilla/5.0"
        assert inside(row["ip"], apple), row["ip"]


def test_microsoft_rows_come_from_the_published_exchange_online_ranges() -> None:
    endpoints = exchange_online()["endpoints"]
    ranges = [ipaddress.ip_network(c) for e in endpoints for c in e.get("ips", [])]
    ms = [r for r in rows() if r["reason"] == "microsoft_prefetch"]
    assert ms
    for row in ms:
        assert inside(row["ip"], ranges), row["ip"]


def test_apple_egress_snapshot_parses() -> None:
    networks = apple_egress()
    assert len(networks) > 20_000
    assert {n.version for n in networks} == {4, 6}
    with (SOURCES / "apple_private_relay_egress.csv").open(newline="", encoding="utf-8") as f:
        for line in csv.reader(f):
            assert len(line) == 4 and len(line[1]) == 2, line


def test_exchange_online_snapshot_parses() -> None:
    data = exchange_online()
    assert data["source"].startswith("https://") and data["published"]
    ids = {e["id"] for e in data["endpoints"]}
    assert {9, 10} <= ids
    for endpoint in data["endpoints"]:
        assert endpoint["serviceArea"] == "Exchange"
        for cidr in endpoint.get("ips", []):
            ipaddress.ip_network(cidr)


def test_crawler_user_agents_snapshot_parses() -> None:
    entries = json.loads((SOURCES / "crawler_user_agents.json").read_text(encoding="utf-8"))
    assert len(entries) > 1000
    for entry in entries:
        pattern = re.compile(entry["pattern"])
        for instance in entry.get("instances", []):
            assert pattern.search(instance), (entry["pattern"], instance)


def test_device_detector_json_is_the_shipped_bots_yml() -> None:
    from_yaml = yaml.safe_load((SOURCES / "device_detector_bots.yml").read_text(encoding="utf-8"))
    converted = json.loads((SOURCES / "device_detector_bots.json").read_text(encoding="utf-8"))
    assert converted["bots"] == from_yaml
    assert len(from_yaml) > 800
    assert all(bot["regex"] and bot["name"] for bot in from_yaml)


def test_named_agents_name_their_sources_and_parse() -> None:
    data = json.loads((SOURCES / "named_agents.json").read_text(encoding="utf-8"))
    for agent in data["agents"]:
        assert agent["kind"] in ("proxied", "machine"), agent["name"]
        assert agent["source"] and agent["source_date"], agent["name"]
        for network in agent["match"].get("networks", []):
            if "/" in network and not network.endswith((".csv", ".json")):
                ipaddress.ip_network(network)
            else:
                assert (SOURCES / network.split(":")[0]).exists() or network.startswith(
                    "machine_rules.json"
                ), network


def test_every_source_file_is_documented() -> None:
    readme = (SOURCES / "README.md").read_text(encoding="utf-8")
    for path in SOURCES.iterdir():
        if path.name != "README.md":
            assert path.name in readme, path.name
