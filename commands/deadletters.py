"""``trackbuf dead list|show|kick|delete``: inspect and replay what the consumer set aside.

``kick`` puts an entry back into beanstalkd (a whole job as it was, a single event
wrapped in a job of its own) and deletes it from ``dead_letters`` in a transaction
committed once the put is acknowledged (so a consumer rejecting it again sets it aside
again rather than finding it still there). Kick after fixing the cause (a schema
change, say), or the consumer sets the entry aside again.

Over a pool of beanstalkd servers a kick puts each entry into the first server of the
pool that takes it: a server that cannot be reached, or refuses the put (draining, out
of memory), is skipped for the rest of the run and the next one tried. Any server will
do: the consumer reserves from all of them. Dead letters live in PostgreSQL, not in
beanstalkd, so ``list``, ``show`` and ``delete`` do not depend on the pool at all.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import asyncpg
import orjson

from store.sql import query
from trackbuf import beanstalk_client, codec
from trackbuf.settings import Settings


async def list_(settings: Settings, limit: int) -> int:
    conn = await asyncpg.connect(settings.require_database())
    try:
        total = await conn.fetchval(query("dead_count"))
        rows = await conn.fetch(query("dead_list"), limit)
    finally:
        await conn.close()
    print(f"{total} dead letter(s)")
    for row in rows:
        created = row["created_at"].isoformat(timespec="seconds")
        event = row["event_id"] or "-"
        reason = " ".join(row["reason"].split())[:160]  # one line per entry
        print(f"{row['id']}\t{created}\t{row['bytes']}B\tevent={event}\t{reason}")
    return 0


async def show(settings: Settings, ids: Sequence[int]) -> int:
    conn = await asyncpg.connect(settings.require_database())
    try:
        rows = await conn.fetch(query("dead_get"), list(ids))
    finally:
        await conn.close()
    missing = set(ids) - {row["id"] for row in rows}
    for row in rows:
        print(f"id: {row['id']}\ncreated_at: {row['created_at'].isoformat()}")
        print(f"event_id: {row['event_id'] or '-'}\nreason: {row['reason']}\nbody:")
        print(_pretty(bytes(row["body"])))
    for ident in sorted(missing):
        print(f"trackbuf dead: no dead letter {ident}", file=sys.stderr)
    return 1 if missing else 0


class Pool:
    """Puts into the first healthy server of the pool, moving on when one fails."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.addresses = list(settings.beanstalkd_addresses)
        self._client: beanstalk_client.Client | None = None

    def put(self, body: bytes) -> None:
        """Put ``body`` into some server; raises Buried (kept, buried) or, when every
        server failed, the last server's error."""
        while self.addresses:
            address = self.addresses[0]
            try:
                if self._client is None:
                    self._client = beanstalk_client.connect(
                        address, self.settings.tube, watch=False
                    )
                self._client.put(body, ttr=self.settings.job_ttr)
                return
            except beanstalk_client.Buried:
                raise
            except (beanstalk_client.BeanstalkError, OSError, EOFError) as exc:
                print(f"trackbuf dead kick: beanstalkd {address[0]}:{address[1]} failed "
                      f"({exc!r}); trying the next server", file=sys.stderr)  # fmt: skip
                self.close()
                self.addresses.pop(0)
                if not self.addresses:
                    raise
        raise OSError("no beanstalkd server left to try")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


async def kick(settings: Settings, ids: Sequence[int], everything: bool) -> int:
    conn = await asyncpg.connect(settings.require_database())
    pool = Pool(settings)
    kicked = 0
    try:
        if everything:
            ids = [row["id"] for row in await conn.fetch(query("dead_all_ids"))]
        rows = await conn.fetch(query("dead_get"), list(ids))
        for row in rows:
            # The row is deleted before the put and the deletion committed after it: a
            # consumer that rejects the job again writes its dead letter only once this
            # commits (the fingerprint's unique index makes it wait), so it is stored
            # anew instead of being taken for the copy about to go. A failed put rolls
            # the deletion back: the entry stays.
            async with conn.transaction():
                await conn.execute(query("dead_delete"), [row["id"]])
                try:
                    pool.put(as_job(bytes(row["body"])))
                except beanstalk_client.Buried:
                    # Stored, but buried (beanstalkd is short of memory): the consumer
                    # kicks buried jobs back, so the dead letter has been handed over.
                    print(f"trackbuf dead kick: {row['id']} was buried by beanstalkd; "
                          "the consumer kicks it back", file=sys.stderr)  # fmt: skip
            kicked += 1
    except (beanstalk_client.BeanstalkError, OSError, EOFError) as exc:
        print(f"trackbuf dead kick: beanstalkd refused the put: {exc!r}", file=sys.stderr)
        return 1
    finally:
        pool.close()
        await conn.close()
    print(f"kicked {kicked} dead letter(s) back into {settings.tube}")
    return 0 if kicked == len(ids) else 1


async def delete(settings: Settings, ids: Sequence[int], everything: bool) -> int:
    conn = await asyncpg.connect(settings.require_database())
    try:
        if everything:
            ids = [row["id"] for row in await conn.fetch(query("dead_all_ids"))]
        status = await conn.execute(query("dead_delete"), list(ids))
    finally:
        await conn.close()
    print(f"deleted {status.split()[-1]} dead letter(s)")
    return 0


def as_job(body: bytes) -> bytes:
    """A dead letter's body as a job: jobs go back as they were, events get a frame."""
    if codec.event_count(body) is not None:
        return body
    try:
        item = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body  # not ours at all: put it back verbatim for the operator's tooling
    if isinstance(item, dict) and "id" in item:
        return codec.encode_job([orjson.dumps(item)])
    return body


def _pretty(body: bytes) -> str:
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return repr(body)
