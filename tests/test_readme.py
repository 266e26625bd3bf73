"""The README: a newcomer's five minutes. The two commands come first, the tour's
output is what the code prints, the Python snippet runs as written, and the rest of
what there is to know is one link away."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from commands.events import COLUMNS
from trackbuf import links, tokens

ROOT = Path(__file__).resolve().parent.parent
KEYS = "k1:a-long-random-secret-for-the-readme"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, re.S | re.M)


def test_the_readme_python_snippet_runs_and_signs_valid_links() -> None:
    (snippet,) = python_blocks((ROOT / "README.md").read_text())
    # Run exactly the snippet, then print what it built, in a fresh interpreter.
    script = snippet + "\nprint(pixel)\nprint(link)\n"
    env = {**os.environ, "TRACKBUF_SIGNING_KEYS": KEYS}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    pixel, link = done.stdout.split()
    keys = tokens.Keyring.parse(KEYS)
    assert pixel.startswith("https://t.example.com/o/") and pixel.endswith(".gif")
    token = pixel.removeprefix("https://t.example.com" + links.OPEN_PREFIX)
    opened = tokens.verify(keys, token.removesuffix(links.OPEN_SUFFIX), "open")
    assert (opened.campaign, opened.recipient) == ("spring", "user-42")
    token = link.removeprefix("https://t.example.com" + links.CLICK_PREFIX)
    clicked = tokens.verify(keys, token, "click")
    assert (clicked.campaign, clicked.recipient, clicked.url) == (
        "spring", "user-42", "https://shop.example/sale",
    )  # fmt: skip


README = (ROOT / "README.md").read_text()
# What the README leaves to pages of their own, each linked from it.
PAGES = (
    "docs/OPERATIONS.md",
    "docs/CONFIGURATION.md",
    "docs/MONITORING.md",
    "docs/DATA.md",
    "docs/UPGRADING.md",
    "docs/CONTRIBUTING.md",
    "BENCHMARKS.md",
)


def test_the_two_commands_come_first_and_ci_runs_the_second() -> None:
    first_block = re.search(r"^```sh\n(.*?)^```", README, re.S | re.M)
    assert first_block is not None and README.index("```sh") < 20
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["./dev run", "./dev test"]
    assert "./dev test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_is_short_and_links_on() -> None:
    assert len(README.splitlines()) <= 170
    for page in PAGES:
        assert f"]({page})" in README, f"README does not link to {page}"


def test_the_tours_events_output_is_what_trackbuf_events_prints() -> None:
    # commands/events.py prints a tab-separated header, then one row per event.
    # The fence that closes the command, the text, then the fence around the output.
    block = README.split("trackbuf events\n", 1)[1].split("```\n")[2]
    header, *rows = block.splitlines()
    assert header == "\t".join(COLUMNS)
    assert rows and all(len(row.split("\t")) == len(COLUMNS) for row in rows)


def test_the_tour_has_a_way_without_a_browser() -> None:
    # Step 6 opens tracked.html in a browser; a server without a screen fetches the
    # pixel and the link from the file instead.
    assert 'grep -o \'src="[^"]*/o/' in README
    assert 'grep -o \'href="[^"]*/c/' in README
