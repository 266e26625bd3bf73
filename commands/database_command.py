"""An operator command's database work, its report printed, and its errors said in one
line with the exit code 1 (``forget``, ``prune``)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import asyncpg

T = TypeVar("T")


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
