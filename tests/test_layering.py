"""ingest and consumer depend on the core, never on each other; the core on neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE_ALLOWED_THIRD_PARTY = {"orjson"}
# The CLI dispatches to both lazily; `up` starts them as processes and uses pgserver;
# `reference` reads both metric registries (lazily) to generate the docs' metric table.
CORE_EXEMPT = {"cli.py", "up.py", "reference.py"}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(("package", "forbidden"), [("ingest", "consumer"), ("consumer", "ingest")])
def test_ingest_and_consumer_never_import_each_other(package: str, forbidden: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    offenders = [str(f.relative_to(ROOT)) for f in files if forbidden in imported_packages(f)]
    assert offenders == [], f"{package} imports {forbidden}"


def test_core_uses_only_stdlib_and_orjson() -> None:
    import sys

    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path in sorted((ROOT / "trackbuf").rglob("*.py")):
        if path.name in CORE_EXEMPT:
            continue
        extra = imported_packages(path) - stdlib - CORE_ALLOWED_THIRD_PARTY - {"trackbuf"}
        assert extra == set(), f"{path.name} imports {extra}"


def test_the_check_itself_sees_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import consumer.worker\nfrom ingest import app\n")
    assert {"consumer", "ingest"} <= imported_packages(probe)
