-- Every query the consumer runs, under a `-- name: <name>` header.

-- name: insert_jobs
-- $1 is a JSON array of job bodies exactly as they came out of beanstalkd; PostgreSQL
-- unpacks them itself, so no Python row is ever built (measured ~1.8x faster than
-- decoding in Python and COPYing). Duplicates (at-least-once delivery) are skipped; the
-- command tag (INSERT 0 n) says how many rows were new. Nothing is RETURNed: computing
-- the latency histogram here (RETURNING into a CTE) cost ~30% of the drain rate.
--
-- Events of a person erased by `trackbuf forget` are skipped while their tombstone lives,
-- in this same statement, so a tombstone committed before it started is always seen.
-- PostgreSQL makes this a hash anti join: the live tombstones are hashed once per
-- statement and, with none (the usual case), each event costs one empty-bucket probe;
-- measured here, no difference in the drain rate with no tombstone and ~10% less with
-- 5,000 live ones. Keep the estimated cost low: a correlated subplan (`... OR NOT
-- EXISTS`) was costed past jit_above_cost, and JIT compiling halved the drain rate.
--
-- events is partitioned by occurred_at, so its key is (event_id, occurred_at); a
-- redelivered event carries the same occurred_at (stamped once, at ingest) and still
-- conflicts.
INSERT INTO events (event_id, kind, occurred_at, campaign, recipient, url, user_agent, ip)
SELECT e.id, e.k, e.t, e.c, e.r, e.u, e.ua, e.ip
FROM jsonb_array_elements($1::jsonb) AS job,
     jsonb_to_recordset(job -> 'e') AS e(
         id uuid, k text, t timestamptz, c text, r text, u text, ua text, ip inet)
WHERE NOT EXISTS (SELECT 1 FROM forgotten f
                  WHERE f.recipient = e.r AND (f.campaign IS NULL OR f.campaign = e.c)
                    AND f.keep_until > now())
ON CONFLICT (event_id, occurred_at) DO NOTHING;

-- name: recent_events
SELECT event_id, kind, occurred_at, stored_at, campaign, recipient, url, user_agent, ip
FROM events
ORDER BY stored_at DESC, event_id DESC
LIMIT $1;

-- name: events_since
SELECT event_id, kind, occurred_at, stored_at, campaign, recipient, url, user_agent, ip
FROM events
WHERE stored_at > $1
ORDER BY stored_at, event_id
LIMIT $2;

-- name: campaign_stats
-- Derived from events, not maintained alongside the insert (which stays lean); the
-- (campaign, occurred_at) index keeps this to one campaign's rows. "machine" marks
-- fetches by image proxies, prefetchers and link scanners, known by user agent
-- (Apple Mail Privacy Protection sends a browser user agent and counts as human).
SELECT kind,
       count(*)::bigint AS total,
       count(DISTINCT recipient)::bigint AS unique_recipients,
       count(*) FILTER (WHERE machine)::bigint AS machine_total,
       count(DISTINCT recipient) FILTER (WHERE NOT machine)::bigint AS human_unique_recipients
FROM (
    SELECT kind, recipient,
           coalesce(user_agent ~* $2, false) AS machine
    FROM events
    WHERE campaign = $1
) AS e
GROUP BY kind
ORDER BY kind;

-- name: insert_dead_letter
-- A body that holds an event of an erased person (a live tombstone) is not kept: the
-- command tag then says 0 rows, as for a body set aside already.
INSERT INTO dead_letters (reason, event_id, body, fingerprint)
SELECT $1::text, $2::uuid, $3::bytea, sha256($3::bytea)
WHERE NOT EXISTS (SELECT 1 FROM forgotten f
                  WHERE f.keep_until > now()
                    AND trackbuf_body_mentions($3::bytea, f.recipient, f.campaign))
ON CONFLICT (fingerprint) DO NOTHING;

-- name: dead_list
SELECT id, created_at, reason, event_id, length(body) AS bytes
FROM dead_letters
ORDER BY id
LIMIT $1;

-- name: dead_get
SELECT id, created_at, reason, event_id, body FROM dead_letters WHERE id = ANY($1::bigint[]) ORDER BY id;

-- name: dead_all_ids
SELECT id FROM dead_letters ORDER BY id;

-- name: dead_delete
DELETE FROM dead_letters WHERE id = ANY($1::bigint[]);

-- name: dead_count
SELECT count(*)::bigint FROM dead_letters;

-- name: forget_tombstone
-- One tombstone per (recipient, campaign or all); forgetting again renews it.
INSERT INTO forgotten (recipient, campaign, keep_until)
VALUES ($1::text, $2::text, now() + make_interval(days => $3::int))
ON CONFLICT (recipient, (coalesce(campaign, '')))
DO UPDATE SET forgotten_at = now(), keep_until = EXCLUDED.keep_until
RETURNING keep_until;

-- name: forget_expire
DELETE FROM forgotten WHERE keep_until <= now();

-- name: ensure_event_partitions
SELECT trackbuf_ensure_event_partitions(2);

-- name: event_partitions
-- Month partitions of events with their upper bound (the DEFAULT partition has none);
-- only tables attached to events, so nothing else is ever listed.
SELECT c.relname AS name,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz
           AS upper_bound
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'events'::regclass
ORDER BY c.relname;
