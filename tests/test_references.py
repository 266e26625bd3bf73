"""The repository stands alone: no file points at documents that are not in it.

Scans every tracked text file (``git ls-files``) for mentions of design notes or a
shared directory kept outside the repository, and every Markdown file for relative
links to files that do not exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Spelled in pieces so this file does not match itself.
OUTSIDE = ("DESIGN" + ".md", ".." + "/shared")
# [text](target) and ![alt](target); the target ends at whitespace or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def tracked_text_files() -> dict[str, str]:
    """Path (relative to the root) -> text, for every tracked file that is text."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    files = {}
    for name in filter(None, listed.split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the work tree, not yet committed
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary (images)
        try:
            files[name] = data.decode()
        except UnicodeDecodeError:
            continue
    return files


def outside_references(files: dict[str, str]) -> list[str]:
    return [
        f"{name}:{number}: {line.strip()}"
        for name, text in files.items()
        for number, line in enumerate(text.splitlines(), 1)
        if any(ref in line for ref in OUTSIDE)
    ]


def markdown_links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of each link outside fenced code blocks."""
    links = []
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            links += [(number, target) for target in LINK.findall(line)]
    return links


def broken_links(files: dict[str, str]) -> list[str]:
    broken = []
    for name, text in files.items():
        if not name.endswith(".md"):
            continue
        for number, target in markdown_links(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # a URL (http:, mailto:) or an anchor in the same page
            relative = target.split("#", 1)[0]
            if not (ROOT / name).parent.joinpath(relative).exists():
                broken.append(f"{name}:{number}: {target}")
    return broken


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    found = tracked_text_files()
    assert "README.md" in found
    return found


def test_nothing_refers_to_documents_outside_the_repository(files: dict[str, str]) -> None:
    assert outside_references(files) == []


def test_relative_markdown_links_point_at_files_in_the_repository(
    files: dict[str, str],
) -> None:
    assert broken_links(files) == []


def test_the_checks_see_what_they_look_for() -> None:
    page = (
        "See [the notes](" + OUTSIDE[0] + ") and [arch](docs/ARCHITECTURE.md#tokens),\n"
        "[gone](docs/NOWHERE.md), [web](https://example.com/x.md), [top](#top),\n"
        "![chart](benchmarks/spike.png)\n"
        "```\n[in code](not-checked.md)\n```\n"
    )
    files = {"README.md": page, "tests/x.py": "# from " + OUTSIDE[1] + "/notes\n"}
    assert [ref.split(":")[0] for ref in outside_references(files)] == ["README.md", "tests/x.py"]
    assert broken_links(files) == [
        "README.md:1: " + OUTSIDE[0],
        "README.md:2: docs/NOWHERE.md",
    ]
