"""Which of a consumer's threads collects the next batch from a server: one at a time.

Several threads waiting in reserve on one server share its jobs out between them, so
under smooth traffic every thread holds a batch that lingers to its deadline with a
share of the jobs: four threads made four times the batches, each a quarter full, and
a batch costs the consumer and PostgreSQL (one statement, its rollup upserts) about the
same whatever it holds. So a thread collects from a server only while it holds that
server's turn, and hands the turn on when its batch closes, so another thread collects
while it writes. Writes still run in parallel: under a backlog a batch fills in a round
trip or two and the turn moves on at once.
"""

from __future__ import annotations

import threading


class Turn:
    """One server's collecting turn within one consumer process."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holder: int | None = None

    def take(self, who: int, timeout: float = 0.0) -> bool:
        """Hold the turn (or keep holding it); wait up to ``timeout`` seconds for it."""
        with self._cond:
            if self._holder is None or self._holder == who:
                self._holder = who
                return True
            if timeout > 0:
                self._cond.wait_for(lambda: self._holder is None, timeout)
            if self._holder is None:
                self._holder = who
                return True
            return False

    def held_by(self, who: int) -> bool:
        with self._cond:
            return self._holder == who

    def give(self, who: int) -> None:
        """Hand the turn on (a no-op unless ``who`` holds it)."""
        with self._cond:
            if self._holder == who:
                self._holder = None
                self._cond.notify()


class Turns:
    """The turns of every server, shared by a process's worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turns: dict[tuple[str, int], Turn] = {}

    def of(self, address: tuple[str, int]) -> Turn:
        with self._lock:
            return self._turns.setdefault(address, Turn())
