"""docs/DATA.md's backup and restore: a dump taken before a `forget` brings the person
back, and the tombstone replay the page gives, run as written, erases them again.

pg_dump and pg_restore of the PostgreSQL the fixtures run; `trackbuf forget` and the
shell block from the page as real processes.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from consumer.writer import EventWriter
from tests.conftest import KEYS
from tests.procs import trackbuf
from tests.servers import Postgres
from trackbuf import codec
from trackbuf import settings as tsettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent
DATA = ROOT / "docs" / "DATA.md"


def replay_block() -> str:
    """The page's shell block that replays the tombstones, exactly as written."""
    blocks = re.findall(r"^```sh\n(.*?)^```", DATA.read_text(), re.S | re.M)
    (block,) = [b for b in blocks if "tombstones.tsv" in b]
    return block


def store(dsn: str, recipients: list[str]) -> None:
    bodies = [
        codec.encode_job([codec.encode_new_event(kind, "spring", r, user_agent="Mozilla/5.0")])
        for r in recipients
        for kind in ("open", "click")
    ]
    db = EventWriter(dsn)
    try:
        assert db.insert_jobs(bodies, len(bodies)).inserted == len(bodies)
    finally:
        db.close()


async def recipients(dsn: str, table: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT DISTINCT recipient FROM {table} ORDER BY 1")
    finally:
        await conn.close()
    return [row["recipient"] for row in rows]


def test_a_restore_from_before_a_forget_is_erased_again_by_the_replay(
    postgres: Postgres, database_url: str, tmp_path: Path
) -> None:
    store(database_url, ["user-1", "user-2", "user-3"])
    dump = tmp_path / "trackbuf.dump"
    tools = postgres.bindir
    subprocess.run(
        [tools / "pg_dump", "--format=custom", f"--file={dump}", database_url],
        check=True, capture_output=True,
    )  # fmt: skip
    settings = tsettings.load({}, overrides={"database_url": database_url, "signing_keys": KEYS})
    forgot = trackbuf(settings, "forget", "--recipient", "user-2")
    assert forgot.returncode == 0, forgot.stderr

    # The restore, into a new database, then migrate, as the page says.
    restored = postgres.dsn("restored_" + str(os.getpid()))
    asyncio.run(create(postgres.dsn(), restored.rsplit("/", 1)[1]))
    subprocess.run(
        [tools / "pg_restore", "--no-owner", f"--dbname={restored}", str(dump)],
        check=True, capture_output=True,
    )  # fmt: skip
    migrated = trackbuf(tsettings.load({}, overrides={"database_url": restored}), "migrate")
    assert migrated.returncode == 0, migrated.stderr
    # What the page warns of: the erased person is back, and has no tombstone.
    assert asyncio.run(recipients(restored, "events")) == ["user-1", "user-2", "user-3"]
    assert asyncio.run(recipients(restored, "forgotten")) == []

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKBUF_")}
    env.update(
        OLD_DATABASE_URL=database_url,
        NEW_DATABASE_URL=restored,
        # psql from the same PostgreSQL, and this checkout's trackbuf.
        PATH=f"{tools}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
    )
    done = subprocess.run(
        ["sh", "-eu", "-c", replay_block()], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "forget recipient 'user-2', all campaigns:" in done.stdout
    assert asyncio.run(recipients(restored, "events")) == ["user-1", "user-3"]
    assert asyncio.run(recipients(restored, "first_events")) == ["user-1", "user-3"]
    assert asyncio.run(recipients(restored, "forgotten")) == ["user-2"]


async def create(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
