"""One beanstalkd server as the enqueuer sees it: a delivery lane.

A lane is a server's put path (``putter.Putter``), its spool replay
(``replay.Replayer``), the requests inside its put in flight, and what decides whether
it gets live work: connected, not stalled, below its high-water mark, not resting after
a refusal, and (among several) not clearly slower than another healthy server. The
enqueuer (``enqueue.Enqueuer``) runs one task per lane.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ingest.putter import PUT_STALL_S, Putter
from ingest.replay import Replayer

if TYPE_CHECKING:
    from ingest.enqueue import Pending

__all__ = ["REST_MAX_S", "REST_S", "SLOW_MARGIN_S", "Lane"]

# A server that refused a put rests this long before it gets live traffic again,
# doubling while it keeps refusing (draining or out of memory lasts a while). Only
# among several servers: a single one is asked again by the next batch.
REST_S = 0.5
REST_MAX_S = 5.0
# A server whose round trip is more than twice another healthy server's plus this margin
# gets no live jobs while that one is there: waiting for the fast server's put in flight
# is quicker than one round trip to the slow one. The margin keeps servers a few
# milliseconds apart (the usual jitter) all in rotation.
SLOW_MARGIN_S = 0.005
RTT_WEIGHT = 0.2  # of the newest round trip in the running average


class Lane:
    """One server: its put path, its replay, and what its put holds."""

    def __init__(self, putter: Putter, replayer: Replayer, stall_s: float) -> None:
        self.putter = putter
        self.replayer = replayer
        self.server = putter.server
        self.stall_s = stall_s  # the putter's stall bound
        # The requests in this lane's put; emptied when a stall hands them elsewhere.
        self.holds: list[Pending] = []
        self.rest_until = 0.0
        self.rest_s = REST_S
        self.changed = asyncio.Event()  # the server may have become usable again
        self.rtt = 0.0  # running average of this server's round trips, seconds
        self.stalled_at = 0.0  # when its command in flight was found stalled
        self.task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        """Connected, not stalled, not resting after a refusal, under its high water."""
        putter = self.putter
        return (
            putter.connected
            and not putter.stalled
            and not putter.full
            and (not self.rest_until or time.monotonic() >= self.rest_until)
        )

    def may_answer(self, now: float) -> bool:
        """Connected and not resting, and not stalled for longer than a single server
        waits before spooling (PUT_STALL_S). Every server of a pool 'stalled' at once
        for a moment is more often this machine short of CPU than three hung servers:
        the spool waits for the single-server bound, as it would with one server."""
        if not self.putter.connected or (self.rest_until and now < self.rest_until):
            return False
        if self.putter.full:
            return False
        return not self.putter.stalled or now - self.stalled_at < PUT_STALL_S - self.stall_s

    def stall_grace(self, now: float) -> float:
        """How long after ``now`` a stalled lane stops counting as one that may answer."""
        return max(PUT_STALL_S - self.stall_s - (now - self.stalled_at), 0.001)

    def rest(self) -> None:
        self.rest_until = time.monotonic() + self.rest_s
        self.rest_s = min(self.rest_s * 2, REST_MAX_S)

    def accepted(self) -> None:
        self.rest_until, self.rest_s = 0.0, REST_S

    def timed(self, seconds: float) -> None:
        # A command that stalled is a fault, handled as one; counted here it would keep
        # the server passed over long after it recovered.
        if seconds < self.stall_s:
            self.rtt += RTT_WEIGHT * (seconds - self.rtt)
