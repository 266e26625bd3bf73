"""What became of an event handed to the enqueuer."""

from __future__ import annotations

import enum


class Outcome(enum.Enum):
    QUEUED = "queued"  # beanstalkd answered INSERTED (or BURIED: stored, needs a kick)
    SPOOLED = "spooled"  # appended to the local spool; replayed later
    LOST = "lost"  # neither worked; counted and logged
    # The spool write outlasted its timeout (a hung disk): the request is answered, and
    # the event is counted spooled or lost when the write really ends.
    UNCONFIRMED = "unconfirmed"
