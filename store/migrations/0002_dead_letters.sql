-- Jobs and events the consumer could not store, set aside with the reason.
-- Kept in PostgreSQL rather than as buried beanstalkd jobs: buried jobs pin old binlog
-- files, so a forgotten one makes the binlog grow without bound.
CREATE TABLE dead_letters (
    id         bigserial   PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    reason     text        NOT NULL,
    event_id   uuid,
    -- Exactly the bytes received: a whole job body, or one event's JSON.
    body       bytea       NOT NULL
);
