"""The consumer's database housekeeping: a round of upkeep now and then at an interval,
in a thread of its own, off the insert path, holding no connection between rounds
(expired ``forget`` tombstones, the coming months' partitions).

The operator commands that share these rounds' SQL (``forget``, ``prune``) run it through
``commands/database_command.py`` instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from store.database import Database, DatabaseUnavailable
from trackbuf.log import kv

log = logging.getLogger("trackbuf.store.upkeep")


def repeat_until_stopped(
    database_url: str,
    stop: threading.Event,
    interval_s: float,
    work: Callable[[Database], None],
    failure_event: str,
    retry_s: float | None = None,
) -> None:
    """Run ``work`` now (at least once, even in a burst run that ends at once) and every
    ``interval_s`` until ``stop``, each round on a fresh connection; after a round that
    failed, the next comes after ``retry_s`` when given (work that must not wait a whole
    interval once it failed)."""
    while True:
        db = Database(database_url)
        failed = True
        try:
            work(db)
            failed = False
        except DatabaseUnavailable:
            pass  # the workers report outages; try again next round
        except Exception as exc:  # never worth stopping the consumer for
            log.warning(kv(failure_event, error=repr(exc)[:200]))
        finally:
            db.close()
        wait = retry_s if failed and retry_s is not None else interval_s
        if stop.wait(wait):
            return
