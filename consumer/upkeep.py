"""What the consumer's housekeeping and the operator commands beside it share.

- ``every``: a round of database upkeep now and then at an interval, in a thread of its
  own, off the insert path, holding no connection between rounds (expired ``forget``
  tombstones, the coming months' partitions).
- ``run_command``: an operator command's database work, its report printed, and its
  errors said in one line with the exit code 1 (``forget``, ``prune``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import asyncpg

from consumer.database import Database, DatabaseUnavailable
from trackbuf.log import kv

log = logging.getLogger("trackbuf.consumer")

T = TypeVar("T")


def every(
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


def run_command(
    command: str,
    work: Coroutine[Any, Any, T],
    render: Callable[[T], str],
    refusal: type[Exception],
) -> int:
    """Run an operator command's database work and print its report; exit 1, with one
    line and no traceback, on ``refusal`` (the command's own "cannot finish") or a
    database error (nothing, or only a first idempotent step, is done: run it again)."""
    try:
        result = asyncio.run(work)
    except refusal as exc:
        print(f"trackbuf {command}: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"trackbuf {command}: database error, run it again: {exc}", file=sys.stderr)
        return 1
    print(render(result))
    return 0
