"""Which package may import which: every import of every module, lazy ones included.

    trackbuf/   the core: the standard library and orjson, nothing of ours above it
    store/      the database side: the core and asyncpg
    ingest/     the request path: the core, never the consumer, the store or the commands
    consumer/   the drain: the core and the store, never ingest or the commands
    commands/   the CLI: the core and the store; only its entry module (main.py) also
                imports the services it runs in-process, ingest and the consumer
    loadtest/   the benchmark tools: anything

So ingest and the consumer share only the core (the wire format, the settings), and
either can be deployed, scaled or replaced alone.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"trackbuf", "store", "ingest", "consumer", "commands", "loadtest"}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
# The packages each of ours may import from the others (itself always).
ALLOWED = {
    "trackbuf": set(),
    "store": {"trackbuf"},
    "ingest": {"trackbuf"},
    "consumer": {"trackbuf", "store"},
    "commands": {"trackbuf", "store"},
}
# The one module of a package allowed more than the rest of it, and what it adds.
ENTRY = {("commands", "main.py"): {"ingest", "consumer"}}
# Third-party packages allowed where the rule is that narrow.
THIRD_PARTY = {"trackbuf": {"orjson"}, "store": {"asyncpg"}}
EXEMPT = {"loadtest"}  # benchmark tooling drives every part from outside


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def violations(root: Path, package: str) -> list[str]:
    """Every module of ``package`` under ``root`` that imports one of our packages it
    may not, or (where THIRD_PARTY narrows it) a third-party package it may not."""
    out = []
    for path in sorted((root / package).rglob("*.py")):
        imported = imported_packages(path) - {package}
        module = path.relative_to(root / package).as_posix()
        allowed = ALLOWED[package] | ENTRY.get((package, module), set())
        wrong = (imported & OURS) - allowed
        if package in THIRD_PARTY:
            wrong |= imported - OURS - STDLIB - THIRD_PARTY[package]
        if wrong:
            out.append(f"{path.relative_to(root)} imports {sorted(wrong)}")
    return out


def test_every_package_has_a_rule() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == OURS
    assert set(ALLOWED) | EXEMPT == OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    assert list((ROOT / package).rglob("*.py")), f"no modules found in {package}"
    assert violations(ROOT, package) == []


def test_the_check_itself_sees_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import consumer.worker\nfrom ingest import app\n")
    assert {"consumer", "ingest"} <= imported_packages(probe)


@pytest.mark.parametrize(
    ("package", "module", "source"),
    [
        ("trackbuf", "x.py", "import asyncpg\n"),
        ("trackbuf", "x.py", "def f():\n    from commands import main\n"),
        ("store", "x.py", "from consumer.classify import classifier\n"),
        ("store", "x.py", "import aiohttp\n"),
        ("ingest", "x.py", "from store.sql import query\n"),
        ("consumer", "x.py", "from commands import status\n"),
        ("consumer", "x.py", "import ingest.app\n"),
        ("commands", "status.py", "from consumer import queue_metrics\n"),
        ("commands", "events.py", "def f():\n    from ingest import server\n"),
    ],
)
def test_the_check_fails_on_a_violation(
    tmp_path: Path, package: str, module: str, source: str
) -> None:
    (tmp_path / package).mkdir()
    (tmp_path / package / module).write_text(source)
    assert violations(tmp_path, package) == [
        f"{package}/{module} imports {sorted(imported_packages(tmp_path / package / module))}"
    ]


def test_the_entry_module_may_run_the_services(tmp_path: Path) -> None:
    (tmp_path / "commands").mkdir()
    (tmp_path / "commands" / "main.py").write_text(
        "def f():\n    from consumer import run\n    from ingest import server\n"
    )
    assert violations(tmp_path, "commands") == []
