-- The consumer's, the reports' and the rebuild's queries, each under a `-- name: <name>` header.

-- name: insert_jobs
-- One statement per batch: store the events, then count the ones it added into the
-- rollups, in the same transaction. Parameters:
--   $1  a JSON array of events in the wire format (trackbuf/codec.py), each with the
--       consumer's verdict added: "m" the machine reason (absent for a person), "cl"
--       the client family and "px" the proxy of a person's proxied fetch
--       (consumer/classify.py);
--   $2  the burst window in seconds, $3 the fewest distinct links that make a burst
--       (consumer/data/machine_rules.json, "timing").
-- Events of a person erased by `trackbuf forget` are skipped while their tombstone lives
-- (step `added`), in this same statement, so a tombstone committed before it started is
-- always seen; PostgreSQL makes that a hash anti join over the few live tombstones.
-- Events older than the retention watermark (`event_retention`) are skipped too: their
-- month was pruned, so such an event is a redelivery of one already counted there (or
-- one so late that retention has already passed it). A NULL time still reaches the
-- INSERT and is refused there, as any bad value is.
-- events is partitioned by occurred_at, so its key is (event_id, occurred_at); a
-- redelivered event carries the same occurred_at (stamped once, at ingest) and still
-- conflicts.
-- Returns the number of events added, and the (campaign, recipient) pairs whose clicks
-- may make a burst: for those the consumer runs burst_mark and burst_firsts in the same
-- transaction. Only added rows reach the rollups (RETURNING), so a duplicate or replayed
-- event never changes a count. Each step is one CTE:
--   incoming    the batch as rows (PostgreSQL unpacks the JSON itself);
--   added       the INSERT into events, RETURNING what it actually added;
--   scoped      each added event once for its campaign and, a click, for its link;
--   claims      the "first event" keys they claim, earliest first, once per key;
--   firsts      the upsert into first_events, RETURNING the claims that moved a first;
--   deltas      total/unique/human counts per (campaign, kind, url, hour);
--   rolled, broken_down   the rollup upserts;
--   suspects    recipients with at least $3 distinct links clicked within 2 x $2 seconds
--               of an added click, counting the clicks already stored (a necessary
--               condition for a burst: burst_mark decides).
-- Upserts take their rows in key order so two batches never lock rows in opposite
-- orders; each key appears once per statement (GROUP BY / DISTINCT ON), as ON
-- CONFLICT DO UPDATE requires.
WITH incoming AS MATERIALIZED (
    SELECT e.*
    -- Keys in byte order, as the rollup tables keep them (see migration 0005).
    FROM jsonb_to_recordset($1::jsonb) AS e(
        id uuid, k text COLLATE "C", t timestamptz, c text COLLATE "C", r text COLLATE "C",
        u text COLLATE "C", ua text, ip inet, m text, cl text, px text)
),
added AS (
    INSERT INTO events (event_id, kind, occurred_at, campaign, recipient, url, user_agent, ip,
                        machine, machine_reason, client, proxy)
    SELECT id, k, t, c, r, u, ua, ip, m IS NOT NULL, m, cl, px
    FROM incoming AS x
    WHERE NOT EXISTS (SELECT 1 FROM forgotten f
                      WHERE f.recipient = x.r AND (f.campaign IS NULL OR f.campaign = x.c)
                        AND f.keep_until > now())
      AND NOT x.t < coalesce((SELECT pruned_before FROM event_retention), '-infinity')
    ON CONFLICT (event_id, occurred_at) DO NOTHING
    RETURNING kind COLLATE "C" AS kind, occurred_at, campaign COLLATE "C" AS campaign,
              recipient COLLATE "C" AS recipient, url COLLATE "C" AS url,
              machine, machine_reason, client, proxy,
              date_trunc('hour', occurred_at, 'UTC') AS hour
),
-- Each added event counts for its campaign (url '') and, a click, for its link.
scoped AS (
    SELECT campaign, recipient, kind, '' AS url, occurred_at, machine, proxy, hour FROM added
    UNION ALL
    SELECT campaign, recipient, kind, url, occurred_at, machine, proxy, hour
    FROM added WHERE kind = 'click' AND url IS NOT NULL
),
claims AS (
    SELECT campaign, recipient, kind, url,
           min(occurred_at) AS first_at,
           min(occurred_at) FILTER (WHERE NOT machine) AS first_human_at
    FROM scoped
    GROUP BY campaign, recipient, kind, url
),
-- A new row is a new unique (and a new human unique when a person's event is in it).
-- An existing row changes only when the claim is earlier (an event that arrived out of
-- order) or brings the first person's event; the old values are kept in prev_* by the
-- same UPDATE, read under the row lock, so the unique leaves its old hour exactly.
-- LEAST ignores NULLs. A fresh row returns prev_first_at NULL; an updated one never
-- does (first_at is NOT NULL).
firsts AS (
    INSERT INTO first_events AS f (campaign, recipient, kind, url, first_at, first_human_at)
    SELECT c.campaign, c.recipient, c.kind, c.url, c.first_at, c.first_human_at
    FROM claims AS c
    -- A claim that changes nothing is skipped without touching the row (ON CONFLICT DO
    -- UPDATE would lock it even when its WHERE is false): the common repeat open.
    WHERE NOT EXISTS (
        SELECT 1 FROM first_events AS s
        WHERE (s.campaign, s.recipient, s.kind, s.url_key)
            = (c.campaign, c.recipient, c.kind, md5(c.url)::uuid)
          AND s.first_at <= c.first_at
          AND (c.first_human_at IS NULL OR s.first_human_at <= c.first_human_at))
    ORDER BY c.campaign, c.recipient, c.kind, md5(c.url)::uuid
    ON CONFLICT (campaign, recipient, kind, url_key) DO UPDATE
        SET prev_first_at = f.first_at, prev_human_at = f.first_human_at,
            first_at = least(f.first_at, EXCLUDED.first_at),
            first_human_at = least(f.first_human_at, EXCLUDED.first_human_at)
        WHERE EXCLUDED.first_at < f.first_at
           OR EXCLUDED.first_human_at < f.first_human_at
           OR (f.first_human_at IS NULL AND EXCLUDED.first_human_at IS NOT NULL)
    RETURNING f.campaign, f.kind, f.url, f.first_at, f.first_human_at,
              f.prev_first_at, f.prev_human_at
),
deltas AS (
    SELECT campaign, kind, url, hour,
           sum(total)::bigint AS total, sum(uniq)::bigint AS uniq,
           sum(human_total)::bigint AS human_total, sum(human_uniq)::bigint AS human_uniq,
           sum(proxied)::bigint AS proxied_total
    FROM (
        SELECT campaign, kind, url, hour,
               1 AS total, 0 AS uniq, (NOT machine)::int AS human_total, 0 AS human_uniq,
               (NOT machine AND proxy IS NOT NULL)::int AS proxied
        FROM scoped
        UNION ALL
        -- The unique in the hour of the recipient's first event...
        SELECT campaign, kind, url, date_trunc('hour', first_at, 'UTC'), 0, 1, 0, 0, 0
        FROM firsts WHERE prev_first_at IS DISTINCT FROM first_at
        UNION ALL
        -- ...and out of the hour it was in, when an earlier event moved it.
        SELECT campaign, kind, url, date_trunc('hour', prev_first_at, 'UTC'), 0, -1, 0, 0, 0
        FROM firsts WHERE prev_first_at <> first_at
        UNION ALL
        SELECT campaign, kind, url, date_trunc('hour', first_human_at, 'UTC'), 0, 0, 0, 1, 0
        FROM firsts
        WHERE first_human_at IS NOT NULL
          AND (prev_first_at IS NULL OR prev_human_at IS DISTINCT FROM first_human_at)
        UNION ALL
        SELECT campaign, kind, url, date_trunc('hour', prev_human_at, 'UTC'), 0, 0, 0, -1, 0
        FROM firsts
        WHERE prev_first_at IS NOT NULL AND prev_human_at IS DISTINCT FROM first_human_at
          AND prev_human_at IS NOT NULL
    ) AS d
    GROUP BY campaign, kind, url, hour
),
rolled AS (
    INSERT INTO rollups AS r (campaign, kind, url, hour, total, uniq, human_total, human_uniq,
                              proxied_total)
    SELECT campaign, kind, url, hour, total, uniq, human_total, human_uniq, proxied_total
    FROM deltas
    WHERE (total, uniq, human_total, human_uniq) <> (0, 0, 0, 0)
    ORDER BY campaign, kind, md5(url)::uuid, hour
    ON CONFLICT (campaign, kind, url_key, hour) DO UPDATE
        SET total = r.total + EXCLUDED.total, uniq = r.uniq + EXCLUDED.uniq,
            human_total = r.human_total + EXCLUDED.human_total,
            human_uniq = r.human_uniq + EXCLUDED.human_uniq,
            proxied_total = r.proxied_total + EXCLUDED.proxied_total
),
-- Machines by reason, proxied people by proxy, other people by client.
broken_down AS (
    INSERT INTO rollup_breakdown AS b (campaign, kind, dimension, value, hour, total)
    SELECT campaign, kind, dimension, value, hour, count(*)
    FROM (
        SELECT campaign, kind,
               CASE WHEN machine THEN 'reason' WHEN proxy IS NOT NULL THEN 'proxy'
                    ELSE 'client' END AS dimension,
               coalesce(CASE WHEN machine THEN machine_reason
                             WHEN proxy IS NOT NULL THEN proxy ELSE client END,
                        'Other') AS value,
               hour
        FROM added
    ) AS x
    GROUP BY campaign, kind, dimension, value, hour
    ORDER BY campaign, kind, dimension, value, hour
    ON CONFLICT (campaign, kind, dimension, value, hour) DO UPDATE
        SET total = b.total + EXCLUDED.total
),
clicked AS (
    SELECT campaign, recipient, min(occurred_at) AS lo, max(occurred_at) AS hi,
           array_agg(DISTINCT url) AS urls
    FROM added WHERE kind = 'click' AND url IS NOT NULL
    GROUP BY campaign, recipient
),
suspects AS (
    SELECT a.campaign, a.recipient
    FROM clicked AS a
    WHERE cardinality(a.urls) >= $3
       OR (SELECT count(DISTINCT u) FROM (
              SELECT unnest(a.urls) AS u
              UNION
              -- The keys here are COLLATE "C"; events' columns are not: compared in
              -- their collation, the index on events serves the lookup.
              SELECT e.url FROM events AS e
              WHERE e.campaign = (a.campaign COLLATE "default")
                AND e.recipient = (a.recipient COLLATE "default") AND e.kind = 'click'
                AND e.occurred_at BETWEEN a.lo - make_interval(secs => 2 * $2)
                                      AND a.hi + make_interval(secs => 2 * $2)
                AND e.url IS NOT NULL) AS n) >= $3
)
SELECT (SELECT count(*) FROM added) AS added,
       (SELECT array_agg(campaign ORDER BY campaign, recipient) FROM suspects) AS campaigns,
       (SELECT array_agg(recipient ORDER BY campaign, recipient) FROM suspects) AS recipients;

-- name: click_locks
-- Before the insert of a batch with clicks, in its transaction: advisory locks on the
-- clickers ($1 campaigns, $2 recipients), taken in one order so two batches never wait
-- on each other in a cycle. The insert's statement starts after they are held, so it
-- sees whatever an earlier batch of the same clickers stored and marked. Clickers share
-- 256 locks (by a hash): every lock held takes a slot of PostgreSQL's shared lock table
-- (max_locks_per_transaction x max_connections, 6,400 by default), and one lock per
-- clicker would let a batch of 1,000 distinct clickers per thread exhaust it. The price:
-- batches whose clickers share a lock are written one after the other.
SELECT count(pg_advisory_xact_lock(7627, k))
FROM (SELECT DISTINCT (hashtext(c || '/' || r) & 255) AS k
      FROM unnest($1::text[], $2::text[]) AS w(c, r)
      ORDER BY k) AS x;

-- name: burst_mark
-- The burst rule, the one definition the insert (for $1/$2, the recipients it found
-- suspect) and rebuild (for every clicker of a campaign) both apply: a person's click
-- (direct, not through a proxy) is a scanner's when its recipient clicked at least $4
-- distinct links of the campaign
-- within $3 seconds either side of it, counting every stored click (machines' too).
-- Every click of a burst is marked, the ones stored by earlier batches included, and
-- the counts follow: the click leaves people's totals and its client's breakdown and
-- joins burst_clicks. People's uniques are put right by burst_firsts, next, which
-- needs this statement's marks to be visible.
WITH who AS (
    SELECT DISTINCT c, r FROM unnest($1::text[], $2::text[]) AS w(c, r)
),
marked AS (
    UPDATE events AS e
    SET machine = true, machine_reason = 'burst_clicks'
    FROM who
    WHERE e.campaign = who.c AND e.recipient = who.r AND e.kind = 'click'
      AND e.url IS NOT NULL AND NOT e.machine AND e.proxy IS NULL
      AND (SELECT count(DISTINCT n.url)
           FROM events AS n
           WHERE n.campaign = e.campaign AND n.recipient = e.recipient AND n.kind = 'click'
             AND n.url IS NOT NULL
             AND n.occurred_at BETWEEN e.occurred_at - make_interval(secs => $3)
                                   AND e.occurred_at + make_interval(secs => $3)) >= $4
    RETURNING e.campaign COLLATE "C" AS campaign, e.kind COLLATE "C" AS kind,
              e.url COLLATE "C" AS url, coalesce(e.client, 'Other') COLLATE "C" AS client,
              date_trunc('hour', e.occurred_at, 'UTC') AS hour
),
people AS (
    SELECT campaign, kind, url, hour, count(*) AS n
    FROM (SELECT campaign, kind, '' AS url, hour FROM marked
          UNION ALL
          SELECT campaign, kind, url, hour FROM marked) AS s
    GROUP BY campaign, kind, url, hour
),
-- Upserts in key order, as the insert's, so the two never deadlock; the rows exist
-- (the marked clicks were counted in them).
rolled AS (
    INSERT INTO rollups AS r (campaign, kind, url, hour, total, uniq, human_total, human_uniq)
    SELECT campaign, kind, url, hour, 0, 0, -n, 0 FROM people
    ORDER BY campaign, kind, md5(url)::uuid, hour
    ON CONFLICT (campaign, kind, url_key, hour) DO UPDATE
        SET human_total = r.human_total + EXCLUDED.human_total
),
moved AS (
    SELECT campaign, kind, 'client' AS dimension, client AS value, hour, -count(*) AS n
    FROM marked GROUP BY campaign, kind, client, hour
    UNION ALL
    SELECT campaign, kind, 'reason', 'burst_clicks', hour, count(*)
    FROM marked GROUP BY campaign, kind, hour
),
broken_down AS (
    INSERT INTO rollup_breakdown AS b (campaign, kind, dimension, value, hour, total)
    SELECT campaign, kind, dimension, value, hour, n FROM moved
    ORDER BY campaign, kind, dimension, value, hour
    ON CONFLICT (campaign, kind, dimension, value, hour) DO UPDATE
        SET total = b.total + EXCLUDED.total
)
SELECT count(*) FROM marked;

-- name: burst_firsts
-- After burst_mark: the first person's click of these recipients ($1/$2), per campaign
-- and per link, taken again from the stored clicks; where it changed, the human unique
-- leaves its hour for the new one (or for none). A '-infinity' first (counted in a
-- pruned month) stays. Rows of a breakdown that fell to 0 are deleted.
WITH who AS (
    SELECT DISTINCT c, r FROM unnest($1::text[], $2::text[]) AS w(c, r)
),
now_first AS (
    SELECT f.campaign, f.recipient, f.kind, f.url, f.url_key, f.first_human_at AS was,
           (SELECT min(e.occurred_at) FROM events AS e
            WHERE e.campaign = (f.campaign COLLATE "default")
              AND e.recipient = (f.recipient COLLATE "default") AND e.kind = 'click'
              AND (f.url = '' OR e.url = f.url) AND NOT e.machine) AS now
    FROM first_events AS f
    JOIN who ON f.campaign = who.c AND f.recipient = who.r
    WHERE f.kind = 'click' AND f.first_human_at IS DISTINCT FROM '-infinity'
),
changed AS (
    UPDATE first_events AS f SET first_human_at = n.now
    FROM now_first AS n
    WHERE (f.campaign, f.recipient, f.kind, f.url_key) = (n.campaign, n.recipient, n.kind, n.url_key)
      AND n.was IS DISTINCT FROM n.now
    RETURNING f.campaign, f.kind, f.url, n.was, n.now
),
deltas AS (
    SELECT campaign, kind, url, hour, sum(d)::bigint AS d
    FROM (SELECT campaign, kind, url, date_trunc('hour', was, 'UTC') AS hour, -1 AS d
          FROM changed WHERE was IS NOT NULL
          UNION ALL
          SELECT campaign, kind, url, date_trunc('hour', now, 'UTC'), 1
          FROM changed WHERE now IS NOT NULL) AS x
    GROUP BY campaign, kind, url, hour
),
rolled AS (
    INSERT INTO rollups AS r (campaign, kind, url, hour, total, uniq, human_total, human_uniq)
    SELECT campaign, kind, url, hour, 0, 0, 0, d FROM deltas WHERE d <> 0
    ORDER BY campaign, kind, md5(url)::uuid, hour
    ON CONFLICT (campaign, kind, url_key, hour) DO UPDATE
        SET human_uniq = r.human_uniq + EXCLUDED.human_uniq
),
emptied AS (
    DELETE FROM rollup_breakdown AS b
    USING who
    WHERE b.campaign = who.c AND b.kind = 'click' AND b.total = 0
)
SELECT count(*) FROM changed;

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
       sum(human_total)::bigint AS human_total, sum(human_uniq)::bigint AS human_uniq,
       sum(proxied_total)::bigint AS proxied_total
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
-- stay queued). $1 is the campaign. Hours before the retention watermark are history
-- (their events were pruned): rebuild leaves them as they are and recounts the rest,
-- with the same definitions as the insert (docs/ANALYTICS.md).

-- name: rebuild_campaigns
SELECT DISTINCT campaign FROM events ORDER BY campaign;

-- name: rebuild_lock
LOCK TABLE first_events, rollups, rollup_breakdown IN EXCLUSIVE MODE;

-- name: rebuild_to_classify
-- $2: every event (after a rules update), or only those stored before classification.
SELECT event_id, occurred_at, user_agent, host(ip) AS ip
FROM events
WHERE campaign = $1 AND ($2 OR machine IS NULL);

-- name: rebuild_set_verdicts
-- By primary key (event_id, occurred_at): one partition's index probe per event.
UPDATE events AS e
SET machine = v.reason IS NOT NULL, machine_reason = v.reason, client = v.client,
    proxy = v.proxy
FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[])
     AS v(id, at, reason, client, proxy)
WHERE e.event_id = v.id AND e.occurred_at = v.at;

-- name: rebuild_clickers
-- Whom burst_mark looks at in a rebuild: every recipient who clicked in the campaign.
SELECT array_agg(campaign) AS campaigns, array_agg(recipient) AS recipients
FROM (SELECT DISTINCT campaign, recipient FROM events
      WHERE campaign = $1 AND kind = 'click') AS x;

-- name: rebuild_clear_firsts
-- Recipients counted in a pruned month ('-infinity') stay counted there; the rest, and
-- their first person's event when that is still stored, are taken again from events.
WITH gone AS (
    DELETE FROM first_events WHERE campaign = $1 AND first_at <> '-infinity'
)
UPDATE first_events SET first_human_at = NULL
WHERE campaign = $1 AND first_at = '-infinity' AND first_human_at <> '-infinity';

-- name: rebuild_clear_rollups
DELETE FROM rollups
WHERE campaign = $1
  AND hour >= coalesce((SELECT pruned_before FROM event_retention), '-infinity');

-- name: rebuild_clear_breakdown
DELETE FROM rollup_breakdown
WHERE campaign = $1
  AND hour >= coalesce((SELECT pruned_before FROM event_retention), '-infinity');

-- name: rebuild_firsts
INSERT INTO first_events AS f (campaign, recipient, kind, url, first_at, first_human_at)
SELECT e.campaign, e.recipient, e.kind, scope.url, min(e.occurred_at),
       min(e.occurred_at) FILTER (WHERE NOT e.machine)
FROM events AS e
CROSS JOIN LATERAL (VALUES (''), (CASE WHEN e.kind = 'click' THEN e.url END)) AS scope(url)
WHERE e.campaign = $1 AND scope.url IS NOT NULL
GROUP BY e.campaign, e.recipient, e.kind, scope.url
ON CONFLICT (campaign, recipient, kind, url_key) DO UPDATE
    SET first_human_at = coalesce(f.first_human_at, EXCLUDED.first_human_at);

-- name: rebuild_rollups
INSERT INTO rollups (campaign, kind, url, hour, total, uniq, human_total, human_uniq,
                     proxied_total)
SELECT campaign, kind, url, hour, sum(total), sum(uniq), sum(human_total), sum(human_uniq),
       sum(proxied)
FROM (
    SELECT e.campaign, e.kind, scope.url, date_trunc('hour', e.occurred_at, 'UTC') AS hour,
           1 AS total, 0 AS uniq, (NOT e.machine)::int AS human_total, 0 AS human_uniq,
           (NOT e.machine AND e.proxy IS NOT NULL)::int AS proxied
    FROM events AS e
    CROSS JOIN LATERAL (VALUES (''), (CASE WHEN e.kind = 'click' THEN e.url END)) AS scope(url)
    WHERE e.campaign = $1 AND scope.url IS NOT NULL
    UNION ALL
    SELECT campaign, kind, url, date_trunc('hour', first_at, 'UTC'), 0, 1, 0, 0, 0
    FROM first_events WHERE campaign = $1 AND first_at <> '-infinity'
    UNION ALL
    SELECT campaign, kind, url, date_trunc('hour', first_human_at, 'UTC'), 0, 0, 0, 1, 0
    FROM first_events
    WHERE campaign = $1 AND first_human_at IS NOT NULL AND first_human_at <> '-infinity'
) AS d
GROUP BY campaign, kind, url, hour;

-- name: rebuild_breakdown
INSERT INTO rollup_breakdown (campaign, kind, dimension, value, hour, total)
SELECT campaign, kind,
       CASE WHEN machine THEN 'reason' WHEN proxy IS NOT NULL THEN 'proxy' ELSE 'client' END,
       coalesce(CASE WHEN machine THEN machine_reason WHEN proxy IS NOT NULL THEN proxy
                     ELSE client END, 'Other'),
       date_trunc('hour', occurred_at, 'UTC'), count(*)
FROM events
WHERE campaign = $1
GROUP BY 1, 2, 3, 4, 5;

-- name: retention_watermark
SELECT coalesce((SELECT pruned_before FROM event_retention), '-infinity'::timestamptz);

-- name: retention_advance
-- `prune`: events before $1 are about to be dropped; the insert skips them from now on.
UPDATE event_retention SET pruned_before = greatest(pruned_before, $1::timestamptz)
RETURNING pruned_before;

-- name: retention_firsts
-- `prune`, after the drops, holding first_events: a recipient whose first event was
-- pruned keeps a row only while they still have stored events in that scope (they were
-- counted in the pruned month: their next event must not count them again), with the
-- pruned times forgotten ('-infinity'); otherwise the row, which names them, goes.
-- $1 the watermark.
WITH old AS (
    SELECT campaign, recipient, kind, url, url_key FROM first_events
    WHERE first_at < $1 OR first_human_at < $1
),
still AS (
    SELECT DISTINCT e.campaign, e.recipient, e.kind, md5(scope.url)::uuid AS url_key
    FROM events AS e
    CROSS JOIN LATERAL (VALUES (''), (CASE WHEN e.kind = 'click' THEN e.url END)) AS scope(url)
    WHERE e.campaign IN (SELECT DISTINCT campaign FROM old) AND scope.url IS NOT NULL
),
dropped AS (
    DELETE FROM first_events AS f
    USING old
    WHERE (f.campaign, f.recipient, f.kind, f.url_key)
        = (old.campaign, old.recipient, old.kind, old.url_key)
      AND NOT EXISTS (SELECT 1 FROM still AS s
                      WHERE (s.campaign, s.recipient, s.kind, s.url_key)
                          = (f.campaign, f.recipient, f.kind, f.url_key))
    RETURNING 1
),
carried AS (
    UPDATE first_events AS f
    SET first_at = CASE WHEN f.first_at < $1 THEN '-infinity' ELSE f.first_at END,
        first_human_at = CASE WHEN f.first_human_at < $1 THEN '-infinity'
                              ELSE f.first_human_at END,
        prev_first_at = NULL, prev_human_at = NULL
    FROM still AS s
    WHERE (f.first_at < $1 OR f.first_human_at < $1)
      AND (s.campaign, s.recipient, s.kind, s.url_key) = (f.campaign, f.recipient, f.kind, f.url_key)
    RETURNING 1
)
SELECT (SELECT count(*) FROM dropped) AS dropped, (SELECT count(*) FROM carried) AS carried;

-- name: forget_uncount
-- `forget`, before the rows go: the recipient's events ($1, in campaign $2 or all) leave
-- the counts they are in, and their uniques the hours they were counted in, so the
-- rollups stay what a recount of the stored events (plus pruned months) gives. What
-- they did in months already pruned is anonymous history and stays. Events stored
-- before classification (machine NULL) were never counted. Run holding the rollup
-- tables (as rebuild does); rows left at zero are deleted by forget_empty.
WITH gone AS (
    SELECT campaign COLLATE "C" AS campaign, kind COLLATE "C" AS kind, url COLLATE "C" AS url,
           machine, proxy IS NOT NULL AND NOT machine AS proxied,
           CASE WHEN machine THEN 'reason' WHEN proxy IS NOT NULL THEN 'proxy' ELSE 'client' END
               COLLATE "C" AS dimension,
           coalesce(CASE WHEN machine THEN machine_reason WHEN proxy IS NOT NULL THEN proxy
                         ELSE client END, 'Other') COLLATE "C" AS value,
           date_trunc('hour', occurred_at, 'UTC') AS hour
    FROM events
    WHERE recipient = $1 AND ($2::text IS NULL OR campaign = $2::text)
      AND machine IS NOT NULL
),
firsts AS (
    SELECT campaign, kind, url, first_at, first_human_at FROM first_events
    WHERE recipient = $1 AND ($2::text IS NULL OR campaign = $2::text)
),
deltas AS (
    SELECT campaign, kind, url, hour, sum(total)::bigint AS total, sum(uniq)::bigint AS uniq,
           sum(human_total)::bigint AS human_total, sum(human_uniq)::bigint AS human_uniq,
           sum(proxied)::bigint AS proxied_total
    FROM (
        SELECT campaign, kind, '' AS url, hour, -1 AS total, 0 AS uniq,
               -(NOT machine)::int AS human_total, 0 AS human_uniq, -proxied::int AS proxied
        FROM gone
        UNION ALL
        SELECT campaign, kind, url, hour, -1, 0, -(NOT machine)::int, 0, -proxied::int
        FROM gone WHERE kind = 'click' AND url IS NOT NULL
        UNION ALL
        SELECT campaign, kind, url, date_trunc('hour', first_at, 'UTC'), 0, -1, 0, 0, 0
        FROM firsts WHERE first_at <> '-infinity'
        UNION ALL
        SELECT campaign, kind, url, date_trunc('hour', first_human_at, 'UTC'), 0, 0, 0, -1, 0
        FROM firsts WHERE first_human_at IS NOT NULL AND first_human_at <> '-infinity'
    ) AS d
    GROUP BY campaign, kind, url, hour
),
rolled AS (
    UPDATE rollups AS r
    SET total = r.total + d.total, uniq = r.uniq + d.uniq,
        human_total = r.human_total + d.human_total, human_uniq = r.human_uniq + d.human_uniq,
        proxied_total = r.proxied_total + d.proxied_total
    FROM deltas AS d
    WHERE (r.campaign, r.kind, r.url_key, r.hour) = (d.campaign, d.kind, md5(d.url)::uuid, d.hour)
    RETURNING 1
),
broken_down AS (
    UPDATE rollup_breakdown AS b SET total = b.total - x.n
    FROM (SELECT campaign, kind, dimension, value, hour, count(*) AS n
          FROM gone GROUP BY 1, 2, 3, 4, 5) AS x
    WHERE (b.campaign, b.kind, b.dimension, b.value, b.hour)
        = (x.campaign, x.kind, x.dimension, x.value, x.hour)
    RETURNING 1
)
SELECT (SELECT count(*) FROM rolled) + (SELECT count(*) FROM broken_down);

-- name: forget_empty
-- Counts a forget took to zero: no stored event is behind them any more.
WITH r AS (
    DELETE FROM rollups
    WHERE total = 0 AND uniq = 0 AND human_total = 0 AND human_uniq = 0
      AND ($1::text IS NULL OR campaign = $1::text)
)
DELETE FROM rollup_breakdown WHERE total = 0 AND ($1::text IS NULL OR campaign = $1::text);
