"""`trackbuf dead` lets an operator see why events were set aside and replay them."""

from __future__ import annotations

import pytest

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
