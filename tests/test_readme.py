"""The README's Python snippet runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
