"""When to wait in beanstalkd and when to take many jobs in one round trip.

Pure logic, unit-tested without servers. A worker asks one server for jobs in two ways:

- **wait**: one blocking ``reserve-with-timeout``; it costs one command per job whatever
  the rate, and nothing while no job comes;
- **take**: k ``reserve-with-timeout 0`` pipelined in one write, for a backlog (a drain
  at one job per round trip would be slow). Every one of the k that finds the queue
  empty is a wasted command: ``TIMED_OUT``, read and parsed by both sides.

``Pace`` chooses k from what the server showed. A round of k is sent only while the
server looks backlogged (the last wait answered at once, or the last round came back
full), and k is at most half the jobs received since the queue was last seen empty
(a ``TIMED_OUT``, or a wait that was not answered at once). So the
wasted replies of all rounds together are at most half the jobs received, whatever the
traffic: at most 1.5 reserve commands per job, plus the blocking reserves that time
out (one a second per idle connection). Under a backlog k doubles from round to round
up to the caller's limit.
"""

from __future__ import annotations

from dataclasses import dataclass

# A blocking reserve answered within this long found its job already waiting (a round
# trip on a local network is well under it); one answered later waited for a put.
# Wrong guesses cost little: a round sent to an empty queue wastes at most k, bounded
# above, and a backlog missed here is found by the next wait, which answers at once.
QUICK_S = 0.001


@dataclass
class Pace:
    """One connection's pacing state (reset with the connection)."""

    most: int = 64
    # Jobs received since the queue was last seen empty on this connection (capped).
    credit: int = 0
    # Does the server look backlogged (take rounds) or drained (wait)?
    taking: bool = False

    def waited(self, got_job: bool, elapsed: float) -> None:
        """A blocking reserve answered after ``elapsed`` seconds, with a job or not."""
        if not got_job:
            self.credit, self.taking = 0, False
            return
        if elapsed < QUICK_S:
            self.credit, self.taking = min(self.credit + 1, 2 * self.most), True
        else:
            # It waited for a put: the queue was empty a moment ago, as after a
            # TIMED_OUT, and what came since is this one job.
            self.credit, self.taking = 1, False

    @property
    def backlogged(self) -> bool:
        """Would a round be sent now (for a batch that takes at least one job)?"""
        return self.round_size(1) > 0

    def round_size(self, wanted: int) -> int:
        """How many ``reserve-with-timeout 0`` to send now (0: wait instead); ``wanted``
        is what the batch could still take."""
        if not self.taking:
            return 0
        return max(0, min(wanted, self.most, self.credit // 2))

    def took(self, asked: int, got: int) -> None:
        """A round of ``asked`` reserves brought ``got`` jobs."""
        if got < asked:
            self.credit, self.taking = 0, False  # the queue ran dry: wait next
        else:
            self.credit = min(self.credit + got, 2 * self.most)
