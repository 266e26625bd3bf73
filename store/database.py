"""One worker thread's PostgreSQL connection, and the batch insert.

asyncpg is asynchronous but each worker thread is a plain blocking loop, so every
``Database`` runs its own private event loop: no loop is shared between threads.

The insert takes events already classified (one JSON array): the verdicts are the
consumer's (``consumer/writer.py`` classifies, then calls ``insert_events``), the SQL
and what a failure means are the database side's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import asyncpg

from store.sql import query

log = logging.getLogger("trackbuf.store.database")

T = TypeVar("T")

CONNECT_TIMEOUT_S = 5.0
# A statement that runs longer than this is treated as a database outage (the batch is
# released and retried later) rather than left to hold its jobs until their TTR.
STATEMENT_TIMEOUT_S = 60.0

# SQLSTATE classes that mean "this data cannot be stored": 22 data exception, 23
# integrity constraint violation, 54 program limit exceeded (a value too large for an
# index row, say: retrying never helps, and without this one such event would hold
# the queue while the database reports itself down). Anything else (connection lost,
# shutdown, disk full, missing table) says nothing against the data, so the batch
# waits for the database.
_DATA_ERROR_CLASSES = ("22", "23", "54")


class DatabaseUnavailable(Exception):
    """The database cannot take writes now; nothing was committed."""


class RejectedData(Exception):
    """The database refused the data itself; retrying the same batch cannot succeed."""


class Database:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = self._run(
                asyncpg.connect(
                    self._dsn,
                    timeout=CONNECT_TIMEOUT_S,
                    command_timeout=STATEMENT_TIMEOUT_S,
                    server_settings={
                        "application_name": "trackbuf-consumer",
                        # The insert is planned for each batch. PostgreSQL guesses 100
                        # rows for any jsonb_to_recordset, so a generic plan made early,
                        # against an empty first_events, is kept as it grows: measured
                        # falling from 26,000 to 11,000 events/s over 200,000 events.
                        # Planning takes ~1 ms of a 1,000-event batch.
                        "plan_cache_mode": "force_custom_plan",
                    },
                )
            )
        return self._conn

    def ping(self) -> None:
        """Raises DatabaseUnavailable, with the server's reason, unless it answers."""
        self._call(lambda conn: conn.fetchval("SELECT 1"))

    def insert_events(
        self,
        payload: str,
        clicker_campaigns: Sequence[str],
        clicker_recipients: Sequence[str],
        burst_window_s: float,
        burst_min_links: int,
    ) -> int:
        """Insert a batch's classified events (one JSON array) and count the ones added
        into the rollups, in one transaction; returns how many rows were added.

        The clickers (campaigns and recipients, paired by position) are who clicked in
        the batch, for the burst rule's locks."""
        added: int = self._call(
            lambda conn: self._insert(conn, payload, clicker_campaigns, clicker_recipients,
                                      burst_window_s, burst_min_links)
        )  # fmt: skip
        return added

    async def _insert(
        self,
        conn: asyncpg.Connection,
        payload: str,
        clicker_campaigns: Sequence[str],
        clicker_recipients: Sequence[str],
        window: float,
        links: int,
    ) -> int:
        """The insert and, when it found clicks that may make a burst, the burst rule
        over those recipients' stored clicks, in one transaction: a burst is marked
        whole, or the batch is not stored.

        A batch with clicks first locks its clickers (click_locks): two batches with
        clicks of the same recipient then run one after the other, the second seeing
        all the first stored and marked, so the burst rule and people's uniques come
        out as a recount of the stored clicks would make them, whatever the threads."""
        async with conn.transaction():
            if clicker_campaigns:
                await conn.execute(query("click_locks"), clicker_campaigns, clicker_recipients)
            row = await conn.fetchrow(query("insert_jobs"), payload, window, links)
            if row["campaigns"]:
                who = (row["campaigns"], row["recipients"])
                await conn.execute(query("burst_mark"), *who, window, links)
                await conn.execute(query("burst_firsts"), *who)
        added: int = row["added"]
        return added

    def execute(self, sql: str, *args: object) -> str:
        result: str = self._call(lambda conn: conn.execute(sql, *args))
        return result

    def _call(self, op: Any) -> Any:
        try:
            conn = self._connection()
            return self._run(op(conn))
        except asyncpg.PostgresError as exc:
            state = getattr(exc, "sqlstate", "") or ""
            if state[:2] in _DATA_ERROR_CLASSES:
                raise RejectedData(f"{state}: {exc}") from None
            self._drop()
            raise DatabaseUnavailable(f"{state}: {exc}") from None
        except (
            OSError,
            asyncpg.InterfaceError,
            # Raised when a connection is killed in the middle of a protocol exchange.
            asyncpg.InternalClientError,
            TimeoutError,
            EOFError,
        ) as exc:
            self._drop()
            raise DatabaseUnavailable(repr(exc)) from None

    def reset(self) -> None:
        """Forget the connection after an unexpected error; the next call reconnects."""
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                self._run(asyncio.wait_for(conn.close(), 2.0))
            except Exception:
                conn.terminate()
        # A connection terminated earlier (after an error) finishes closing its socket in
        # a callback of this loop: let it run, or the socket is left to the collector.
        self._run(asyncio.sleep(0))
        self._loop.close()
