"""The consumer's database connection: a batch's events classified, then inserted.

The connection, its error handling and the insert's SQL are the database side's
(``store/database.py``); what this adds is the consumer's verdict on each event
(``consumer/verdicts.py``) and the burst rule's parameters from its rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from consumer.classify import classifier
from consumer.verdicts import Unreadable, annotate
from store.database import Database, RejectedData


@dataclass(frozen=True)
class WriteResult:
    events: int
    inserted: int

    @property
    def duplicates(self) -> int:
        """Events skipped as already stored. ``events`` is the sum of the job headers'
        counts, which only size batches: the insert stores every event a job holds,
        so a header that under-counts gives more rows than ``events``, never fewer
        than zero duplicates."""
        return max(self.events - self.inserted, 0)


class EventWriter(Database):
    """A worker thread's connection that stores job bodies: ``insert_jobs``."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self._classifier = classifier()

    def insert_jobs(self, bodies: Sequence[bytes], events: int) -> WriteResult:
        """Classify and insert every event of these job bodies, and count the ones
        added into the rollups, in one transaction (one statement)."""
        try:
            batch = annotate(bodies, self._classifier)
        except Unreadable as exc:
            raise RejectedData(str(exc)) from None
        burst = self._classifier.rules.burst
        inserted = self.insert_events(
            batch.payload,
            batch.clicker_campaigns,
            batch.clicker_recipients,
            burst.window_seconds,
            burst.min_links,
        )
        return WriteResult(events, inserted)
