"""The enqueuer for the configured beanstalkd servers: one server, or a pool.

Chosen in one place for ingest and for ``trackbuf spool replay``, which puts a spool
directory back through the same put path (high-water mark included).
"""

from __future__ import annotations

from ingest.enqueue import Enqueuer
from ingest.metrics import IngestMetrics
from ingest.pool import PoolEnqueuer
from ingest.spool import Spool
from trackbuf.settings import Settings

AnyEnqueuer = Enqueuer | PoolEnqueuer


def make_enqueuer(settings: Settings, metrics: IngestMetrics, spool: Spool | None) -> AnyEnqueuer:
    addresses = settings.beanstalkd_addresses
    if len(addresses) == 1:
        return Enqueuer(
            addresses[0], settings.tube, ttr=settings.job_ttr,
            max_job_bytes=settings.max_job_bytes, metrics=metrics, spool=spool,
            linger_s=settings.job_linger_ms / 1000, queue_max_bytes=settings.queue_max_bytes,
        )  # fmt: skip
    # Several servers: one delivery lane each (ingest/pool.py).
    return PoolEnqueuer(
        addresses, settings.tube, ttr=settings.job_ttr,
        max_job_bytes=settings.max_job_bytes, metrics=metrics, spool=spool,
        linger_s=settings.job_linger_ms / 1000, queue_max_bytes=settings.queue_max_bytes,
    )  # fmt: skip
