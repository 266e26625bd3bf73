"""trackbuf's signer and verifier against the committed test vectors (docs/TOKENS.md),
and the spec's Node.js example against the same vectors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.data import make_token_vectors
from trackbuf import links, tokens
from trackbuf.redirect_hosts import RedirectHosts, RedirectHostsError
from trackbuf.tokens import InvalidToken, Keyring, KeyringError, LinkPayload

ROOT = Path(__file__).resolve().parents[2]
VECTORS: dict[str, Any] = json.loads(
    (ROOT / "tests" / "data" / "token_vectors.json").read_text(encoding="utf-8")
)
VALID, INVALID = VECTORS["valid"], VECTORS["invalid"]
ALL_KEYS = Keyring.parse(",".join(f"{kid}:{secret}" for kid, secret in VECTORS["keys"].items()))


def names(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


def payload_of(v: dict[str, Any]) -> LinkPayload:
    return LinkPayload(v["kind"], v["campaign"], v["recipient"], v["url"], v["expires"])


@pytest.mark.parametrize("v", VALID, ids=names(VALID))
def test_signing_gives_the_vector_token_and_link(v: dict[str, Any]) -> None:
    keys = Keyring.parse(f"{v['kid']}:{VECTORS['keys'][v['kid']]}")
    assert tokens.sign(keys, payload_of(v)) == v["token"]
    base, args = VECTORS["public_url"], (keys, v["campaign"], v["recipient"])
    if v["kind"] == "open":
        assert links.open_url(base, *args, expires=v["expires"]) == v["link"]
    else:
        assert links.click_url(base, *args, v["url"], expires=v["expires"]) == v["link"]


@pytest.mark.parametrize("v", VALID, ids=names(VALID))
def test_vector_tokens_verify(v: dict[str, Any]) -> None:
    assert tokens.verify(ALL_KEYS, v["token"], v["kind"], now=VECTORS["now"]) == payload_of(v)


@pytest.mark.parametrize("v", INVALID, ids=names(INVALID))
def test_invalid_vector_tokens_are_refused_for_their_reason(v: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken) as info:
        tokens.verify(ALL_KEYS, v["token"], v["kind"], now=VECTORS["now"])
    assert info.value.reason == v["reason"]


def test_the_committed_vectors_are_what_the_script_makes() -> None:
    # A change to the format must come with regenerated vectors (and a spec to match).
    committed = (ROOT / "tests" / "data" / "token_vectors.json").read_text(encoding="utf-8")
    assert make_token_vectors.render() == committed


def spec_javascript() -> str:
    spec = (ROOT / "docs" / "TOKENS.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```js\n(.*?)^```$", spec, flags=re.M | re.S)
    assert len(blocks) == 1, "docs/TOKENS.md must hold exactly one ```js block"
    return str(blocks[0])


# Appended to the spec's example: signs every valid vector with its functions.
HARNESS = """
const vectors = JSON.parse(require("fs").readFileSync(0, "utf8"));
const made = vectors.valid.map((v) => {
  const secret = vectors.keys[v.kid];
  const expires = v.expires === null ? undefined : v.expires;
  return v.kind === "open"
    ? openUrl(vectors.public_url, v.kid, secret, v.campaign, v.recipient, expires)
    : clickUrl(vectors.public_url, v.kid, secret, v.campaign, v.recipient, v.url, expires);
});
console.log(JSON.stringify(made));
"""


def test_the_node_example_in_the_spec_makes_the_vector_links(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the spec's JavaScript example cannot be run")
    script = tmp_path / "example.js"
    script.write_text(spec_javascript() + HARNESS, encoding="utf-8")
    done = subprocess.run(
        [node, str(script)],
        input=json.dumps(VECTORS),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    *example_lines, harness_line = done.stdout.splitlines()
    # The example's own output: the first two vectors, an open and a click link.
    assert example_lines == [VALID[0]["link"], VALID[1]["link"]]
    assert json.loads(harness_line) == [v["link"] for v in VALID]


IRI_TARGETS = VECTORS["iri_targets"]


@pytest.mark.parametrize("v", IRI_TARGETS, ids=names(IRI_TARGETS))
def test_a_non_ascii_target_verifies_percent_encoded(v: dict[str, Any]) -> None:
    assert json.loads(v["json"])[4] != v["target"]  # signed raw, not as redirected to
    payload = tokens.verify(ALL_KEYS, v["token"], v["kind"], now=VECTORS["now"])
    assert payload.url == v["target"]


def test_the_redirect_hosts_vectors() -> None:
    hosts = VECTORS["redirect_hosts"]
    allowlist = RedirectHosts.parse(hosts["setting"])
    for url in hosts["allowed"] + hosts["refused"]:
        assert tokens.is_safe_target(url), url  # a target a click may carry...
    assert [u for u in hosts["allowed"] if not allowlist.allows(u)] == []
    assert [u for u in hosts["refused"] if allowlist.allows(u)] == []  # ...but not here
    for setting in hosts["bad_settings"]:
        with pytest.raises(RedirectHostsError):
            RedirectHosts.parse(setting)


def test_the_key_entry_vectors() -> None:
    entries = VECTORS["key_entries"]
    for entry in entries["accepted"]:
        kid, _, secret = entry.partition(":")  # the secret: all after the first ':'
        assert Keyring.parse(entry).keys == {kid: secret.encode()}
    for entry in entries["refused"]:
        with pytest.raises(KeyringError):
            Keyring.parse(entry)
