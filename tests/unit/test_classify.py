"""Machine or person, and which client: real-world requests, each with its verdict."""

from __future__ import annotations

import pytest

from consumer.classify import (
    MACHINE,
    PERSON,
    PROXIED,
    REASONS,
    Classifier,
    Rules,
    classifier,
    rules,
)

IPHONE_MAIL = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)
MAC_MAIL = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
)
CHROME_WIN = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
HOME = "198.51.100.23"  # an ordinary residential address (documentation range)

# (user agent, address, expected reason or None for a person, expected client family)
CASES: list[tuple[str | None, str | None, str | None, str | None]] = [
    # People: mail clients and browsers, anywhere.
    (IPHONE_MAIL, HOME, None, "Mobile Safari UI/WKWebView"),
    (MAC_MAIL, HOME, None, "Apple Mail"),
    (MAC_MAIL, "17.58.63.10", None, "Apple Mail"),  # Apple staff on Apple's network
    ("Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)", HOME, None,
     "Outlook"),
    ("Mozilla/4.0 (compatible; ms-office; MSOffice 16)", HOME, None, "Outlook"),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Thunderbird/115.6.0", HOME, None,
     "Thunderbird"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:109.0) Gecko/20100101 Thunderbird/115.5.0",
     "2001:db8::7", None, "Thunderbird"),
    ("Outlook-iOS/709.2189947.prod.iphone (4.2.0)", HOME, None, "Outlook-iOS"),
    (CHROME_WIN, HOME, None, "Chrome"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/119.0.0.0 Safari/537.36 Edg/119.0.0.0", HOME, None, "Edge"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0", HOME,
     None, "Firefox"),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/120.0.6099.43 Mobile Safari/537.36", HOME, None, "Chrome Mobile"),
    ("Mozilla/5.0 (Linux; Android 12; SM-G991B Build/SP1A.210812.016; wv) AppleWebKit/537.36 "
     "(KHTML, like Gecko) Version/4.0 Chrome/119.0 Mobile Safari/537.36", HOME, None, None),
    # "Cubot" is a phone maker: a naive "bot" substring rule would call this a robot.
    ("Mozilla/5.0 (Linux; Android 13; Cubot KingKong 9) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/120.0 Mobile Safari/537.36", HOME, None, None),
    ("Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Mobile/15E148", HOME, None, "Mobile Safari UI/WKWebView"),
    # Unknown agents are people; no agent at all ("": ingest keeps a missing header as
    # empty) is a machine (every mail client and browser sends one; named_agents.json,
    # "No user agent"). An agent ingest did not keep (None: TRACKBUF_USER_AGENT_MODE=
    # drop) is unknown: only rules that need no agent apply.
    ("SomeNewMailApp/1.0", HOME, None, None),
    ("", HOME, "bot", "Other"),
    ("", None, "bot", "Other"),
    (None, HOME, None, "Other"),
    (None, None, None, "Other"),
    (None, "40.107.22.90", "microsoft_prefetch", "Other"),  # an address rule needs no agent
    (None, "104.28.28.1", None, "Other"),  # Apple's rule needs its bare agent: cannot tell
    ("Mozilla/5.0", HOME, None, "Other"),  # bare agent, not from Apple: unknown, a person
    ("Mozilla/5.0", "not-an-address", None, "Other"),
    # Apple Mail Privacy Protection: bare agent from Apple's network.
    ("Mozilla/5.0", "17.58.63.10", "apple_mpp", "Other"),
    ("Mozilla/5.0", "17.120.1.1", "apple_mpp", "Other"),
    # Gmail's image proxy.
    ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
     "66.249.84.10", "google_image_proxy", "GmailImageProxy"),
    ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
     None, "google_image_proxy", None),
    # Yahoo's.
    ("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html", "98.137.1.1",
     "yahoo_proxy", "YahooMailProxy"),
    # Microsoft: link previews, existence checks, and fetches from its mail-flow ranges.
    ("Mozilla/5.0 (Windows NT 10.0; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) BingPreview/1.0b",
     HOME, "link_preview", None),
    ("Mozilla/5.0 (Windows NT 6.1; WOW64) SkypeUriPreview Preview/0.5 "
     "skype-url-preview@microsoft.com", HOME, "link_preview", None),
    ("Microsoft Office Existence Discovery", HOME, "microsoft_prefetch", None),
    (CHROME_WIN, "40.107.22.90", "microsoft_prefetch", "Chrome"),
    (CHROME_WIN, "52.101.4.3", "microsoft_prefetch", "Chrome"),
    (CHROME_WIN, "104.47.10.1", "microsoft_prefetch", "Chrome"),
    # Security gateways, by agent and by their published ranges.
    ("Mozilla/5.0 (compatible; Barracuda Sentinel)", HOME, "security_scanner", None),
    ("Mimecast URL Protect", HOME, "security_scanner", None),
    ("Proofpoint URL Defense", HOME, "security_scanner", None),
    ("Cisco IronPort", HOME, "security_scanner", None),
    (CHROME_WIN, "64.235.150.1", "security_scanner", "Chrome"),
    (CHROME_WIN, "209.222.82.9", "security_scanner", "Chrome"),
    (CHROME_WIN, "205.139.110.40", "security_scanner", "Chrome"),
    (CHROME_WIN, "195.130.217.5", "security_scanner", "Chrome"),
    # Robots and scripts.
    ("curl/8.4.0", HOME, "bot", "curl"),
    ("python-requests/2.31.0", HOME, "bot", "Python Requests"),
    ("Go-http-client/1.1", HOME, "bot", "Go-http-client"),
    ("Wget/1.21", HOME, "bot", "Wget"),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", HOME, "bot",
     "Googlebot"),
    ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", HOME, "bot",
     "bingbot"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "HeadlessChrome/120.0.0.0 Safari/537.36", HOME, "bot", "HeadlessChrome"),
    ("facebookexternalhit/1.1", HOME, "link_preview", None),
    ("Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", HOME, "link_preview", None),
    # From the maintained lists (crawler-user-agents, device-detector).
    ("Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)", HOME, "bot", None),
    # Apple Mail Privacy Protection through iCloud Private Relay, outside 17.0.0.0/8.
    ("Mozilla/5.0", "104.28.28.1", "apple_mpp", "Other"),
    # A webmail image proxy named only by the maintained lists' sources: a person.
    ("Mozilla/5.0 (compatible; SeznamEmailProxy/1.0; +https://napoveda.seznam.cz)", HOME,
     "other_webmail_proxy", None),
    ("python-urllib3/1.26", HOME, "bot", None),
    ("node-fetch/1.0", HOME, "bot", None),
    ("okhttp/4.9.0", HOME, "bot", "okhttp"),
    ("Apache-HttpClient/4.5.13 (Java/11)", HOME, "bot", "Apache-HttpClient"),
    # A named fetcher wins over a generic rule; the agent's rule over the address's (a
    # person through Yahoo's proxy stays a person, whatever the address).
    ("curl/8.4.0", "40.107.22.90", "microsoft_prefetch", "curl"),
    ("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html", "17.1.1.1",
     "yahoo_proxy", "YahooMailProxy"),
]  # fmt: skip


# Webmail image proxies: a person displayed the message (a proxied person, not a machine).
PROXIES = {"google_image_proxy", "yahoo_proxy", "other_webmail_proxy"}


@pytest.mark.parametrize(("agent", "ip", "reason", "client"), CASES)
def test_each_request_gets_its_verdict(
    agent: str | None, ip: str | None, reason: str | None, client: str | None
) -> None:
    verdict = classifier().classify(agent, ip)
    if reason in PROXIES:
        assert (verdict.kind, verdict.proxy, verdict.reason) == (PROXIED, reason, None)
    else:
        assert verdict.reason == reason and verdict.proxy is None
        assert verdict.kind == (PERSON if reason is None else MACHINE)
    assert verdict.machine is (reason is not None and reason not in PROXIES)
    if client is not None:
        assert verdict.client == client
    assert verdict.client  # always a family, "Other" when unknown


def test_the_table_is_large_and_covers_every_address_and_agent_reason() -> None:
    assert len(CASES) >= 40
    seen = {reason for _, _, reason, _ in CASES}
    # burst: test_rollups; prefetch (a request header): test_fetch_corpus_pipeline.
    assert seen == (set(REASONS) - {"burst_clicks", "prefetch"}) | {None}


def test_the_shipped_rules_are_versioned_and_sourced() -> None:
    import json
    from importlib import resources

    doc = json.loads(resources.files("consumer").joinpath("data/machine_rules.json").read_text())
    assert rules().version == doc["version"]
    entries = [*doc["user_agents"], *doc["networks"], doc["bots"], doc["timing"]["burst_clicks"]]
    for entry in entries:
        assert entry["source"] and entry["date"], entry
    assert rules().burst.min_links >= 2 and rules().burst.window_seconds > 0


def test_rules_with_an_unknown_reason_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown reason"):
        Rules.parse({"version": "x", "user_agents": [{"reason": "nope", "contains": ["a"]}],
                     "networks": [], "bots": {}, "timing": {}})  # fmt: skip


def test_verdicts_are_cached_per_agent() -> None:
    fresh = Classifier(rules())
    for _ in range(3):
        fresh.classify(CHROME_WIN, HOME)
    fresh.classify(CHROME_WIN, "192.0.2.1")  # same agent, another address
    assert fresh.pair.cache_info().hits == 2
    assert (fresh.by_agent.cache_info().misses, fresh.by_agent.cache_info().hits) == (1, 1)


def test_apples_egress_file_as_downloaded_is_read_and_a_bad_line_is_named() -> None:
    import ipaddress

    from consumer.sources import apple_egress

    ranges = apple_egress("172.224.226.0/27,GB,GB-EN,London,\n2a02:26f7:b3c0:4000::/64,GB,,,\n")
    assert ipaddress.ip_address("172.224.226.9") in ranges
    assert ipaddress.ip_address("2a02:26f7:b3c0:4000::1") in ranges
    assert ipaddress.ip_address("172.224.226.32") not in ranges
    with pytest.raises(ValueError, match="line 2: 'not-a-cidr'"):
        apple_egress("172.224.226.0/27,GB,,\nnot-a-cidr,GB,,\n")


def test_a_newer_egress_file_named_by_the_operator_replaces_the_snapshot(
    tmp_path: object,
) -> None:
    from pathlib import Path

    from consumer.classify import configure
    from trackbuf import settings as tsettings

    newer = Path(str(tmp_path)) / "egress-ip-ranges.csv"
    newer.write_text("192.0.2.0/24,ZZ,,,\n")
    settings = tsettings.load({"TRACKBUF_APPLE_EGRESS_CSV": str(newer)})
    configure(settings.apple_egress_csv)
    try:
        judge = classifier()
        assert judge.classify("Mozilla/5.0", "192.0.2.7").reason == "apple_mpp"
        assert judge.classify("Mozilla/5.0", "104.28.28.1").reason is None  # not in it
    finally:
        configure("")
    assert classifier().classify("Mozilla/5.0", "104.28.28.1").reason == "apple_mpp"


@pytest.mark.parametrize(
    ("pattern", "literals"),
    [
        ("Googlebot\\/", ["Googlebot/"]),
        ("Automaton|Newsify Feed Fetcher", ["Automaton", "Newsify Feed Fetcher"]),
        ("(?:Chirp|gotosocial)/\\d", ["Chirp", "gotosocial"]),
        ("[a-z]+bot", ["bot"]),
        ("a?b", ["b"]),
        ("x|[0-9]", []),
    ],
)
def test_the_literal_a_pattern_needs_is_read_from_its_parse_tree(
    pattern: str, literals: list[str]
) -> None:
    from consumer.sources import required_literals

    assert required_literals(pattern) == literals


def test_the_indexed_lists_answer_as_trying_every_pattern_would() -> None:
    import csv
    from pathlib import Path

    from consumer.sources import load

    corpus = Path(__file__).resolve().parents[1] / "data" / "fetch_corpus.csv"
    with corpus.open(encoding="utf-8") as handle:
        agents = [row["user_agent"] for row in csv.DictReader(handle)]
    for patterns in load().lists:
        for agent in agents:
            slow = next((p.reason for p in patterns.patterns if p.regex.search(agent)), None)
            assert patterns.match(agent) == slow, agent


def test_a_consumer_given_an_unreadable_egress_file_says_so_and_exits_2(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathlib import Path

    from consumer import run as consumer_run
    from consumer.classify import configure
    from tests.servers import free_port
    from trackbuf import settings as tsettings

    bad = Path(str(tmp_path)) / "egress.csv"
    bad.write_text("172.224.226.0/27,GB,,,\n<html>not the file</html>\n")
    settings = tsettings.load({}, overrides={"database_url": "postgresql://t@127.0.0.1:9/t",
                                             "metrics_listen": f"127.0.0.1:{free_port()}",
                                             "apple_egress_csv": str(bad)})  # fmt: skip
    try:
        assert consumer_run.run(settings) == 2
    finally:
        configure("")
    assert "line 2: '<html>not the file</html>' is not a CIDR" in capsys.readouterr().err
