"""How long a job stays open for more events before it is put.

Natural batching alone (take whatever arrived while the previous put was in flight)
makes small jobs at moderate rates: a put on a nearby server answers in a tenth of a
millisecond, and at 3,000 events/s the next event comes 0.3 ms later. Every job costs
its own put, its own reserve and delete in the consumer, and its own records in
beanstalkd's memory and binlog. Holding the first event of a job for a few
milliseconds (5 by default) lets the next ones join it.

The wait is counted from the arrival of the job's *first* event, so no event waits
more than ``seconds`` for the linger, and a job that already waited (behind a put in
flight, or handed back after a failed put) goes at once. It ends early once ``enough``
events wait: under heavy load jobs fill while the previous put is in flight and the
linger adds nothing. docs/ARCHITECTURE.md ("Natural batching, and a short linger") has
the figures.
"""

from __future__ import annotations

import asyncio

__all__ = ["ENOUGH_EVENTS", "Linger"]

# A job of this many events is worth putting now: past it, the put's own cost per event
# (a put, a reserve, a delete, binlog records: about 0.4 ms of CPU across the pipeline)
# is small next to the request's, and waiting longer only adds latency. 16 ended 5 ms
# lingers at smooth 3,000 events/s before the job was worth it (BENCHMARKS.md).
ENOUGH_EVENTS = 32


class Linger:
    """The linger of one enqueuer: told of each arrival, awaited before each put."""

    def __init__(self, seconds: float, enough: int = ENOUGH_EVENTS) -> None:
        self.seconds = seconds
        self._enough = enough
        self._first_at = 0.0
        self._full = asyncio.Event()

    def arrived(self, waiting: int) -> None:
        """An event was added; ``waiting`` events now wait for a put (with it)."""
        if waiting == 1:
            self._first_at = asyncio.get_running_loop().time()
            self._full.clear()
        elif waiting >= self._enough:
            self._full.set()

    async def wait(self, waiting: int) -> None:
        """Until the job of the ``waiting`` events is worth putting."""
        if not self.seconds or waiting >= self._enough:
            return
        delay = self._first_at + self.seconds - asyncio.get_running_loop().time()
        if delay <= 0:
            return
        try:
            async with asyncio.timeout(delay):
                await self._full.wait()
        except TimeoutError:
            pass
