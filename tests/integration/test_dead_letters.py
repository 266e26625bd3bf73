"""`trackbuf dead` lets an operator see why events were set aside and replay them."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import asyncpg
import pytest

from consumer import run as consumer_run
from tests.integration.test_pipeline import drain, rows
from tests.procs import trackbuf
from tests.servers import Beanstalkd
from trackbuf import codec
from trackbuf.events import new_event

pytestmark = pytest.mark.integration


def test_list_show_kick_and_delete(make_settings, beanstalkd: Beanstalkd) -> None:
    settings = make_settings(threads=1)
    good = new_event("open", "c", "fixed-later")
    # An event the database refuses today: its campaign is too long for a CHECK we add.
    with beanstalkd.client() as client:
        client.put(codec.encode_job([codec.encode_event(good)]))
        client.put(b"\x00garbage")
    rows(settings.database_url, "ALTER TABLE events ADD CONSTRAINT no_c CHECK (campaign <> 'c')")
    assert drain(settings) == 0
    assert rows(settings.database_url) == []

    listed = trackbuf(settings, "dead", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("2 dead letter(s)")
    assert "no_c" in listed.stdout and "not a trackbuf v1 frame" in listed.stdout
    ids = {line.split("\t")[0]: line for line in listed.stdout.splitlines()[1:]}
    event_id = next(i for i, line in ids.items() if "no_c" in line)
    garbage_id = next(i for i in ids if i != event_id)

    shown = trackbuf(settings, "dead", "show", event_id)
    assert shown.returncode == 0 and str(good.event_id) in shown.stdout
    assert trackbuf(settings, "dead", "show", "999999").returncode == 1

    # The operator fixes the cause, then replays the event.
    rows(settings.database_url, "ALTER TABLE events DROP CONSTRAINT no_c")
    kicked = trackbuf(settings, "dead", "kick", event_id)
    assert kicked.returncode == 0, kicked.stderr
    assert drain(settings) == 0
    stored = rows(settings.database_url)
    assert [r["event_id"] for r in stored] == [good.event_id]

    deleted = trackbuf(settings, "dead", "delete", garbage_id)
    assert deleted.returncode == 0 and "deleted 1" in deleted.stdout
    assert trackbuf(settings, "dead", "list").stdout.startswith("0 dead letter(s)")
    assert trackbuf(settings, "dead", "kick").returncode == 2  # neither ids nor --all


def test_3_an_entry_kicked_and_rejected_again_is_set_aside_again(
    make_settings, beanstalkd: Beanstalkd
) -> None:
    """`dead kick` while a consumer runs and the cause is not fixed: the consumer sets
    the job aside again, and the entry must still be there afterwards, not vanish."""
    settings = make_settings(threads=1)
    dsn = settings.database_url
    rows(dsn, "ALTER TABLE events ADD CONSTRAINT no_c CHECK (campaign <> 'c')")
    with beanstalkd.client() as client:
        client.put(codec.encode_job([codec.encode_event(new_event("open", "c", "still-bad"))]))
    assert drain(settings) == 0
    (entry,) = rows(dsn, "SELECT id FROM dead_letters")

    stop = threading.Event()
    consumer = threading.Thread(target=consumer_run.run, args=(settings, stop, None))
    consumer.start()
    kicked: list[subprocess.CompletedProcess[str]] = []
    try:
        # Hold the entry's row a while, so the consumer has long since rejected the
        # kicked job again by the time the kick's own write to the row goes through.
        async def hold_then_kick() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                async with conn.transaction():
                    await conn.execute("SELECT 1 FROM dead_letters WHERE id = $1 FOR UPDATE",
                                       entry["id"])  # fmt: skip
                    kick = threading.Thread(
                        target=lambda: kicked.append(trackbuf(settings, "dead", "kick", "--all"))
                    )
                    kick.start()
                    await asyncio.sleep(3)
                kick.join(60)
            finally:
                await conn.close()

        asyncio.run(hold_then_kick())
        assert kicked and kicked[0].returncode == 0, kicked
        deadline = time.monotonic() + 30
        while not rows(dsn, "SELECT 1 FROM dead_letters") and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        consumer.join(30)
    assert len(rows(dsn, "SELECT 1 FROM dead_letters")) == 1
    assert rows(dsn) == []
    with beanstalkd.client() as client:
        assert client.stats_tube(settings.tube)["current-jobs-ready"] == 0
