-- Every query the consumer runs, under a `-- name: <name>` header.

-- name: insert_jobs
-- One statement per batch: store the events, then count the ones it added into the
-- rollups, in the same transaction. Parameters:
--   $1  a JSON array of events in the wire format (trackbuf/codec.py), each with the
--       consumer's verdict added: "m" the machine reason (absent for a person) and "cl"
--       the client family (consumer/classify.py);
--   $2  the burst window in seconds, $3 the fewest distinct links that make a burst
--       (consumer/data/machine_rules.json, "timing").
-- Events of a person erased by `trackbuf forget` are skipped while their tombstone lives
-- (step `added`), in this same statement, so a tombstone committed before it started is
-- always seen; PostgreSQL makes that a hash anti join over the few live tombstones.
-- events is partitioned by occurred_at, so its key is (event_id, occurred_at); a
-- redelivered event carries the same occurred_at (stamped once, at ingest) and still
-- conflicts.
-- Returns the number of events added. Only added rows reach the rollups (RETURNING),
-- so a duplicate or replayed event never changes a count. Each step is one CTE:
--   incoming    the batch as rows (PostgreSQL unpacks the JSON itself);
--   bursts      clicks that are part of a burst (see below);
--   classified  incoming with its final verdict;
--   added       the INSERT into events, RETURNING what it actually added;
--   scoped      each added event once for its campaign and, a click, for its link;
--   claims      the "first event" keys they claim, earliest first, once per key;
--   firsts      the upsert into first_events, RETURNING the claims that were firsts;
--   deltas      total/unique/human counts per (campaign, kind, url, hour);
--   rolled, broken_down   the rollup upserts.
-- Upserts take their rows in key order so two batches never lock rows in opposite
-- orders; each key appears once per statement (GROUP BY / DISTINCT ON), as ON
-- CONFLICT DO UPDATE requires.
WITH incoming AS MATERIALIZED (
    SELECT e.*
    -- Keys in byte order, as the rollup tables keep them (see migration 0005).
    FROM jsonb_to_recordset($1::jsonb) AS e(
        id uuid, k text COLLATE "C", t timestamptz, c text COLLATE "C", r text COLLATE "C",
        u text COLLATE "C", ua text, ip inet, m text, cl text)
),
-- A burst: one recipient clicking at least $3 distinct links of a campaign within $2
-- seconds of this click, counting this batch and the first clicks already stored
-- (link scanners follow every link of a message at once). Only people's clicks are
-- looked at; the rest already have a reason.
recent_clicks AS (
    SELECT c, r, u, t FROM incoming WHERE k = 'click' AND u IS NOT NULL
    UNION ALL
    SELECT f.campaign, f.recipient, f.url, f.first_at
    FROM first_events AS f
    JOIN (SELECT DISTINCT c, r FROM incoming WHERE k = 'click' AND m IS NULL) AS who
      ON f.campaign = who.c AND f.recipient = who.r AND f.kind = 'click' AND f.url <> ''
),
bursts AS (
    SELECT i.id
    FROM incoming AS i
    JOIN recent_clicks AS n
      ON n.c = i.c AND n.r = i.r
     AND n.t BETWEEN i.t - make_interval(secs => $2) AND i.t + make_interval(secs => $2)
    WHERE i.k = 'click' AND i.u IS NOT NULL AND i.m IS NULL
    GROUP BY i.id
    HAVING count(DISTINCT n.u) >= $3
),
classified AS (
    SELECT i.id, i.k, i.t, i.c, i.r, i.u, i.ua, i.ip, i.cl,
           CASE WHEN b.id IS NOT NULL THEN 'burst_clicks' ELSE i.m END AS reason
    FROM incoming AS i
    LEFT JOIN bursts AS b ON b.id = i.id
),
added AS (
    INSERT INTO events (event_id, kind, occurred_at, campaign, recipient, url, user_agent, ip,
                        machine, machine_reason, client)
    SELECT id, k, t, c, r, u, ua, ip, reason IS NOT NULL, reason, cl
    FROM classified AS x
    WHERE NOT EXISTS (SELECT 1 FROM forgotten f
                      WHERE f.recipient = x.r AND (f.campaign IS NULL OR f.campaign = x.c)
                        AND f.keep_until > now())
    ON CONFLICT (event_id, occurred_at) DO NOTHING
    RETURNING kind COLLATE "C" AS kind, occurred_at, campaign COLLATE "C" AS campaign,
              recipient COLLATE "C" AS recipient, url COLLATE "C" AS url,
              machine, machine_reason, client,
              date_trunc('hour', occurred_at, 'UTC') AS hour
),
-- Each added event counts for its campaign (url '') and, a click, for its link.
scoped AS (
    SELECT campaign, recipient, kind, '' AS url, occurred_at, machine, hour FROM added
    UNION ALL
    SELECT campaign, recipient, kind, url, occurred_at, machine, hour
    FROM added WHERE kind = 'click' AND url IS NOT NULL
),
claims AS (
    SELECT campaign, recipient, kind, url,
           min(occurred_at) AS first_at,
           min(occurred_at) FILTER (WHERE NOT machine) AS first_human_at
    FROM scoped
    GROUP BY campaign, recipient, kind, url
),
firsts AS (
    INSERT INTO first_events AS f (campaign, recipient, kind, url, first_at, first_human_at)
    SELECT c.campaign, c.recipient, c.kind, c.url, c.first_at, c.first_human_at
    FROM claims AS c
    -- A recipient seen before, whose claim adds nothing, is skipped without touching
    -- the row (ON CONFLICT DO UPDATE would lock it even when its WHERE is false).
    WHERE NOT EXISTS (
        SELECT 1 FROM first_events AS s
        WHERE (s.campaign, s.recipient, s.kind, s.url_key)
            = (c.campaign, c.recipient, c.kind, md5(c.url)::uuid)
          AND (s.first_human_at IS NOT NULL OR c.first_human_at IS NULL))
    ORDER BY c.campaign, c.recipient, c.kind, md5(c.url)::uuid
    ON CONFLICT (campaign, recipient, kind, url_key) DO UPDATE
        SET first_human_at = EXCLUDED.first_human_at, human_later = true
        WHERE f.first_human_at IS NULL AND EXCLUDED.first_human_at IS NOT NULL
    RETURNING f.campaign, f.kind, f.url, f.first_at, f.first_human_at, f.human_later
),
deltas AS (
    SELECT campaign, kind, url, hour,
           sum(total)::bigint AS total, sum(uniq)::bigint AS uniq,
           sum(human_total)::bigint AS human_total, sum(human_uniq)::bigint AS human_uniq
    FROM (
        SELECT campaign, kind, url, hour,
               1 AS total, 0 AS uniq, (NOT machine)::int AS human_total, 0 AS human_uniq
        FROM scoped
        UNION ALL
        -- A first_events row inserted now: a new unique (and a new human unique if
        -- its first event was a person's, possibly in a later hour).
        SELECT campaign, kind, url, date_trunc('hour', first_at, 'UTC'), 0, 1, 0, 0
        FROM firsts WHERE NOT human_later
        UNION ALL
        SELECT campaign, kind, url, date_trunc('hour', first_human_at, 'UTC'), 0, 0, 0, 1
        FROM firsts WHERE first_human_at IS NOT NULL
    ) AS d
    GROUP BY campaign, kind, url, hour
),
rolled AS (
    INSERT INTO rollups AS r (campaign, kind, url, hour, total, uniq, human_total, human_uniq)
    SELECT campaign, kind, url, hour, total, uniq, human_total, human_uniq
    FROM deltas
    ORDER BY campaign, kind, md5(url)::uuid, hour
    ON CONFLICT (campaign, kind, url_key, hour) DO UPDATE
        SET total = r.total + EXCLUDED.total, uniq = r.uniq + EXCLUDED.uniq,
            human_total = r.human_total + EXCLUDED.human_total,
            human_uniq = r.human_uniq + EXCLUDED.human_uniq
),
broken_down AS (
    INSERT INTO rollup_breakdown AS b (campaign, kind, dimension, value, hour, total)
    SELECT campaign, kind, dimension, value, hour, count(*)
    FROM (
        SELECT campaign, kind, CASE WHEN machine THEN 'reason' ELSE 'client' END AS dimension,
               coalesce(CASE WHEN machine THEN machine_reason ELSE client END, 'Other') AS value,
               hour
        FROM added
    ) AS x
    GROUP BY campaign, kind, dimension, value, hour
    ORDER BY campaign, kind, dimension, value, hour
    ON CONFLICT (campaign, kind, dimension, value, hour) DO UPDATE
        SET total = b.total + EXCLUDED.total
)
SELECT count(*) FROM added;

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

-- Reports (`trackbuf stats`) read the rollups, never the raw events. $1 campaign,
-- $2/$3 the half-open range [from, to) of UTC hours (NULL: unbounded).

-- name: report_totals
SELECT kind,
       sum(total)::bigint AS total, sum(uniq)::bigint AS uniq,
       sum(human_total)::bigint AS human_total, sum(human_uniq)::bigint AS human_uniq
FROM rollups
WHERE campaign = $1 AND url = ''
  AND ($2::timestamptz IS NULL OR hour >= $2) AND ($3::timestamptz IS NULL OR hour < $3)
GROUP BY kind;

-- name: report_breakdown
SELECT kind, dimension, value, sum(total)::bigint AS total
FROM rollup_breakdown
WHERE campaign = $1
  AND ($2::timestamptz IS NULL OR hour >= $2) AND ($3::timestamptz IS NULL OR hour < $3)
GROUP BY kind, dimension, value
ORDER BY kind, dimension, sum(total) DESC, value;

-- name: report_links
SELECT url,
       sum(total)::bigint AS total, sum(uniq)::bigint AS uniq,
       sum(human_total)::bigint AS human_total, sum(human_uniq)::bigint AS human_uniq
FROM rollups
WHERE campaign = $1 AND kind = 'click' AND url <> ''
  AND ($2::timestamptz IS NULL OR hour >= $2) AND ($3::timestamptz IS NULL OR hour < $3)
GROUP BY url
ORDER BY sum(human_uniq) DESC, sum(total) DESC, url;

-- name: report_days
-- $4 the time zone whose calendar days group the UTC hours.
SELECT (hour AT TIME ZONE $4)::date AS day, kind,
       sum(total)::bigint AS total, sum(uniq)::bigint AS uniq,
       sum(human_total)::bigint AS human_total, sum(human_uniq)::bigint AS human_uniq
FROM rollups
WHERE campaign = $1 AND url = ''
  AND ($2::timestamptz IS NULL OR hour >= $2) AND ($3::timestamptz IS NULL OR hour < $3)
GROUP BY 1, kind
ORDER BY 1, kind;

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

-- `trackbuf rollups rebuild`: one campaign at a time, in one transaction, holding the
-- rollup tables so no insert counts into them meanwhile (consumers wait, their jobs
-- stay queued). $1 is the campaign.

-- name: rebuild_campaigns
SELECT DISTINCT campaign FROM events ORDER BY campaign;

-- name: rebuild_lock
LOCK TABLE first_events, rollups, rollup_breakdown IN EXCLUSIVE MODE;

-- name: rebuild_to_classify
-- $2: every event (after a rules update), or only those stored before classification.
SELECT event_id, user_agent, host(ip) AS ip
FROM events
WHERE campaign = $1 AND ($2 OR machine IS NULL);

-- name: rebuild_set_verdicts
UPDATE events AS e
SET machine = v.reason IS NOT NULL, machine_reason = v.reason, client = v.client
FROM unnest($1::uuid[], $2::text[], $3::text[]) AS v(id, reason, client)
WHERE e.event_id = v.id;

-- name: rebuild_bursts
-- The burst rule over all of a campaign's clicks ($2 window seconds, $3 fewest links).
-- The insert sees only what is stored when it runs, so a burst split across batches
-- that committed at the same moment can leave its first clicks counted as a person's.
UPDATE events AS e
SET machine = true, machine_reason = 'burst_clicks'
WHERE e.campaign = $1 AND e.kind = 'click' AND e.url IS NOT NULL AND NOT e.machine
  AND (SELECT count(DISTINCT n.url)
       FROM events AS n
       WHERE n.campaign = e.campaign AND n.recipient = e.recipient AND n.kind = 'click'
         AND n.occurred_at BETWEEN e.occurred_at - make_interval(secs => $2)
                               AND e.occurred_at + make_interval(secs => $2)) >= $3;

-- name: rebuild_clear_firsts
DELETE FROM first_events WHERE campaign = $1;

-- name: rebuild_clear_rollups
DELETE FROM rollups WHERE campaign = $1;

-- name: rebuild_clear_breakdown
DELETE FROM rollup_breakdown WHERE campaign = $1;

-- name: rebuild_firsts
INSERT INTO first_events (campaign, recipient, kind, url, first_at, first_human_at)
SELECT e.campaign, e.recipient, e.kind, scope.url, min(e.occurred_at),
       min(e.occurred_at) FILTER (WHERE NOT e.machine)
FROM events AS e
CROSS JOIN LATERAL (VALUES (''), (CASE WHEN e.kind = 'click' THEN e.url END)) AS scope(url)
WHERE e.campaign = $1 AND scope.url IS NOT NULL
GROUP BY e.campaign, e.recipient, e.kind, scope.url;

-- name: rebuild_rollups
INSERT INTO rollups (campaign, kind, url, hour, total, uniq, human_total, human_uniq)
SELECT campaign, kind, url, hour, sum(total), sum(uniq), sum(human_total), sum(human_uniq)
FROM (
    SELECT e.campaign, e.kind, scope.url, date_trunc('hour', e.occurred_at, 'UTC') AS hour,
           1 AS total, 0 AS uniq, (NOT e.machine)::int AS human_total, 0 AS human_uniq
    FROM events AS e
    CROSS JOIN LATERAL (VALUES (''), (CASE WHEN e.kind = 'click' THEN e.url END)) AS scope(url)
    WHERE e.campaign = $1 AND scope.url IS NOT NULL
    UNION ALL
    SELECT campaign, kind, url, date_trunc('hour', first_at, 'UTC'), 0, 1, 0, 0
    FROM first_events WHERE campaign = $1
    UNION ALL
    SELECT campaign, kind, url, date_trunc('hour', first_human_at, 'UTC'), 0, 0, 0, 1
    FROM first_events WHERE campaign = $1 AND first_human_at IS NOT NULL
) AS d
GROUP BY campaign, kind, url, hour;

-- name: rebuild_breakdown
INSERT INTO rollup_breakdown (campaign, kind, dimension, value, hour, total)
SELECT campaign, kind, CASE WHEN machine THEN 'reason' ELSE 'client' END,
       coalesce(CASE WHEN machine THEN machine_reason ELSE client END, 'Other'),
       date_trunc('hour', occurred_at, 'UTC'), count(*)
FROM events
WHERE campaign = $1
GROUP BY 1, 2, 3, 4, 5;
