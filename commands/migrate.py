"""``trackbuf migrate``: create or upgrade the schema (``store/migrate.py``), and say
which migrations it applied."""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from store import migrate
from trackbuf.redact import masked_dsn


def run(database_url: str) -> int:
    try:
        applied = asyncio.run(migrate.run(database_url))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Unreachable, refused, no such database, bad password: the message says which.
        print(f"trackbuf migrate: cannot migrate {masked_dsn(database_url)}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"migrations applied: {applied or 'none (schema is current)'}")
    return 0
