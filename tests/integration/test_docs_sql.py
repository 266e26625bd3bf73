"""SQL quoted in the docs runs against the schema the migrations make.

Every fenced ```sql block of README.md, docs/*.md and BENCHMARKS.md runs, inside a
transaction that is rolled back, on a fresh migrated database; a block that names one
of the named queries (``-- name: report_totals``) must also be that query, as
store/queries.sql has it. So a renamed column or table fails here, not in front of
an operator.
"""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import pytest

from store import sql as named_sql
from tests.conftest import run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent
BLOCK = re.compile(r"^```sql\n(.*?)^```", re.S | re.M)
NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.M)


def sql_blocks() -> list[tuple[str, str]]:
    pages = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [
        (str(page.relative_to(ROOT)), block)
        for page in pages
        for block in BLOCK.findall(page.read_text())
    ]


def _normal(text: str) -> str:
    text = re.sub(r"--[^\n]*", "", text)
    return " ".join(text.split()).rstrip(";")


def test_the_docs_quote_sql() -> None:
    # The check below must have something to check.
    assert sql_blocks()


def test_named_queries_in_the_docs_are_the_consumers_own() -> None:
    queries = named_sql.queries()
    for page, block in sql_blocks():
        for name in NAME.findall(block):
            assert name in queries, f"{page}: no query named {name}"
            body = block.split(f"name: {name}", 1)[1]
            assert _normal(queries[name]) in _normal(body), f"{page}: {name} differs"


@pytest.mark.parametrize(("page", "block"), sql_blocks())
def test_the_sql_in_the_docs_runs_on_the_migrated_schema(
    database_url: str, page: str, block: str
) -> None:
    async def check() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            transaction = conn.transaction()
            await transaction.start()
            try:
                # Statements with $n parameters are prepared (checked, not run).
                for statement in filter(str.strip, _statements(block)):
                    if re.search(r"\$\d", statement):
                        await conn.prepare(statement)
                    else:
                        await conn.execute(statement)
            finally:
                await transaction.rollback()
        finally:
            await conn.close()

    try:
        run(check())
    except asyncpg.PostgresError as exc:
        pytest.fail(f"{page}: {exc}\n{block}")


def _statements(block: str) -> list[str]:
    # Blocks in the docs hold plain statements; no semicolons inside strings.
    return [s + ";" for s in block.split(";") if _normal(s)]
