"""``trackbuf spool replay --dir DIR``: put a spool directory into beanstalkd, from any
host.

For the spool of an ingest host that is gone (scaled down, replaced, its disk moved
to another machine): the same claim as an ingest start (files a live ingest holds
are left to it, ``spool.Spool.open``) and the same put path and high-water mark as
ingest (``enqueue.Enqueuer.from_settings``), so a replay never overfills beanstalkd; it
waits for the consumer to drain a full server, up to ``--timeout``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from ingest.enqueue import Enqueuer
from ingest.metrics import IngestMetrics
from ingest.spool import Spool
from trackbuf.settings import Settings, SettingsError


def run(settings: Settings, directory: str, timeout: float) -> int:
    """0 when the directory's spool is all in beanstalkd, 1 when some is left."""
    path = Path(directory)
    if not path.is_dir():
        raise SettingsError(f"spool replay: {directory} is not a directory")
    return asyncio.run(_replay(settings, path, timeout))


async def _replay(settings: Settings, path: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    spool = Spool(path, settings.spool_max_bytes, settings.spool_fsync)
    metrics = IngestMetrics.create(CollectorRegistry())
    enqueuer = Enqueuer.from_settings(settings, metrics, spool)
    await enqueuer.start()  # claims the files nobody holds
    found, found_bytes = spool.pending_events, spool.pending_bytes
    print(f"{path}: {found:,} event(s), {found_bytes:,} bytes to replay", flush=True)
    # close() replays what the spool holds before it returns (replay.replay_before_exit).
    await enqueuer.close(max(deadline - time.monotonic(), 0.0))
    left = spool.left_at_close
    print(f"{path}: replayed {found - left:,} event(s), {left:,} left", flush=True)
    if left:
        print("left: no beanstalkd server took them in time (see the log line above)")
    return 1 if left else 0
