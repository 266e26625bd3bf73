-- One definition of every count: what the insert counts as it goes is exactly what
-- `trackbuf rollups rebuild` recounts from the stored events, plus the counts of
-- months `trackbuf prune` dropped (docs/ANALYTICS.md, "One definition of a count").

-- Retention watermark: every event before `pruned_before` (a UTC month boundary) was
-- dropped by `prune`, and the rollups of hours before it are history that no recount
-- can make again. The insert skips an event older than it (a redelivery of a pruned
-- month would otherwise be stored in the DEFAULT partition and counted twice), and
-- rebuild recounts only the hours after it.
CREATE TABLE event_retention (
    only_row      boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    pruned_before timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO event_retention DEFAULT VALUES;

-- A recipient's first event is the earliest one, whatever order events arrive in: an
-- earlier event stored later moves the unique to its hour. The upsert writes the
-- values it replaced here, so the same statement takes the unique out of the old hour
-- (read under the row lock: exact with concurrent writers). human_later is replaced
-- by this. A first_at (or first_human_at) of '-infinity' marks a recipient counted in
-- a pruned month who still has stored events: already counted, its time forgotten.
ALTER TABLE first_events
    ADD COLUMN prev_first_at timestamptz,
    ADD COLUMN prev_human_at timestamptz,
    DROP COLUMN human_later;

-- The burst rule looks at one recipient's clicks around a click, stored ones included
-- (so every click of a burst is marked, whichever batch brought it). Clicks only: the
-- drain's opens pay nothing for it.
CREATE INDEX events_click_recipient ON events (campaign, recipient, occurred_at)
    WHERE kind = 'click';
