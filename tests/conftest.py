"""Fixtures: real beanstalkd and PostgreSQL on free ports, started and stopped by tests.

One PostgreSQL cluster serves the session; each test gets its own database, cloned
from a migrated template (``CREATE DATABASE ... TEMPLATE``), so tests never share rows.
Tests that stop or kill PostgreSQL ask for ``own_postgres`` instead.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from hypothesis import settings as hypothesis_settings

from tests.servers import Beanstalkd, Postgres
from trackbuf import settings as tsettings
from trackbuf.tokens import Keyring

# Property tests check what holds, not how fast: hypothesis' default 200 ms deadline per
# example failed a token property in CI when a cold first example waited for a busy CPU.
hypothesis_settings.register_profile("trackbuf", deadline=None)
hypothesis_settings.load_profile("trackbuf")

TEMPLATE = "trackbuf_template"
FAST_PATH_VARIABLE = "TRACKBUF_TEST_FAST_PATH"
KEYS = "k2:second-signing-key-for-tests-00000000,k1:first-signing-key-for-tests-000000000"
_db_names = itertools.count()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _migrate_template(dsn_admin: str, dsn_template: str) -> None:
    from store.migrate import migrate

    admin = await asyncpg.connect(dsn_admin)
    try:
        await admin.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await admin.close()
    conn = await asyncpg.connect(dsn_template)
    try:
        await migrate(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = Postgres().start()
    run(_migrate_template(server.dsn(), server.dsn(TEMPLATE)))
    yield server
    server.destroy()


def new_database(server: Postgres) -> str:
    name = f"t{os.getpid()}_{next(_db_names)}"

    async def create() -> None:
        conn = await asyncpg.connect(server.dsn())
        try:
            await conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        finally:
            await conn.close()

    run(create())
    return server.dsn(name)


@pytest.fixture
def database_url(postgres: Postgres) -> str:
    """A fresh, migrated database for this test."""
    return new_database(postgres)


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    """A cluster of this test's own, to stop, kill and restart."""
    server = Postgres().start()
    run(_migrate_template(server.dsn(), server.dsn(TEMPLATE)))
    yield server
    server.destroy()


@pytest.fixture
def beanstalkd(tmp_path: Path) -> Iterator[Beanstalkd]:
    server = Beanstalkd(tmp_path / "binlog").start()
    yield server
    server.kill()


POOL_SIZE = 3


@pytest.fixture
def beanstalkd_pool(tmp_path: Path) -> Iterator[list[Beanstalkd]]:
    """Three independent beanstalkd servers, each with its own binlog: a client-side
    pool. Pass ``pool_address(beanstalkd_pool)`` as the ``beanstalkd`` setting."""
    servers = [Beanstalkd(tmp_path / f"binlog-{i}").start() for i in range(POOL_SIZE)]
    yield servers
    for server in servers:
        server.kill()


def pool_address(servers: list[Beanstalkd]) -> str:
    """The ``beanstalkd`` setting naming every server of a pool."""
    return ",".join(server.address for server in servers)


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    from tests.procs import LIVE

    yield
    while LIVE:
        LIVE.pop().kill()


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.parse(KEYS)


@pytest.fixture
def make_settings(beanstalkd: Beanstalkd, database_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Settings pointing at this test's servers, with free ports for listeners."""
    from tests.servers import free_port

    def make(**overrides: object) -> tsettings.Settings:
        base: dict[str, object] = {
            "database_url": database_url,
            "beanstalkd": beanstalkd.address,
            "signing_keys": KEYS,
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "metrics_listen": f"127.0.0.1:{free_port()}",
            "linger_ms": 50,
            "spool_dir": str(tmp_path / "spool"),
            "shutdown_timeout": 10.0,
            # ./dev test runs the ingest suites a second time with aiohttp answering
            # every request (TRACKBUF_FAST_PATH=0), the path the fast one must match.
            "fast_path": os.environ.get(FAST_PATH_VARIABLE, "1") != "0",
        }
        base.update(overrides)
        return tsettings.load({}, overrides=base)

    return make
