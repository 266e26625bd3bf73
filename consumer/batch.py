"""Batching rules: a batch is ready when it is full or its linger time is up.

Pure logic, no I/O, so the rules are unit-tested without servers. A fresh ``Batch``
is made for each batch rather than resetting one (no state leaks between batches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Batch(Generic[T]):
    max_events: int
    linger_s: float
    items: list[T] = field(default_factory=list)
    events: int = 0
    opened_at: float | None = None

    def add(self, item: T, events: int, now: float) -> None:
        if self.opened_at is None:
            self.opened_at = now
        self.items.append(item)
        self.events += events

    @property
    def full(self) -> bool:
        return self.events >= self.max_events

    def due(self, now: float) -> bool:
        """Full, or non-empty and lingered long enough."""
        if not self.items:
            return False
        return self.full or self.remaining(now) <= 0

    def jobs_wanted(self, most: int) -> int:
        """How many more jobs to ask for at once: enough to fill the batch if they are
        the size of the jobs so far, at least one and at most ``most``."""
        if not self.items:
            return 1
        missing = self.max_events - self.events
        if missing <= 0:
            return 0
        per_job = max(self.events // len(self.items), 1)
        return max(1, min(most, -(-missing // per_job)))

    def remaining(self, now: float) -> float:
        """Seconds until the linger deadline (the full linger if the batch is empty)."""
        if self.opened_at is None:
            return self.linger_s
        return self.opened_at + self.linger_s - now


def halves(items: list[T]) -> tuple[list[T], list[T]]:
    """Split for bisection when a batch holds an event the database rejects."""
    middle = len(items) // 2
    return items[:middle], items[middle:]
