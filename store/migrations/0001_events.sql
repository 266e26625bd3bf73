-- Raw events, one row per open or click, keyed by the id ingest gave the event.
-- event_id is a UUIDv7 (time-ordered), so the primary key grows at its right edge.
CREATE TABLE events (
    event_id    uuid        PRIMARY KEY,
    kind        text        NOT NULL CHECK (kind IN ('open', 'click')),
    occurred_at timestamptz NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now(),
    campaign    text        NOT NULL,
    recipient   text        NOT NULL,
    url         text,
    user_agent  text,
    ip          inet
);

-- Per-campaign reports (`trackbuf stats`) and dashboards filter on campaign and time.
CREATE INDEX events_campaign_time ON events (campaign, occurred_at);

-- `trackbuf events --tail` follows rows by arrival; BRIN suits an append-ordered column
-- and costs almost nothing to maintain, unlike a third B-tree.
CREATE INDEX events_stored_at ON events USING brin (stored_at);
