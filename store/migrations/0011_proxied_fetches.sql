-- Three kinds of fetch: a person (direct), a person through a proxy, a machine.
--
-- A webmail image proxy (Gmail's, Yahoo's...) fetches the pixel when a person displays
-- the message: the open is real, but the device and the address are the proxy's. Such
-- an event is a person's (machine false, so it is in people's totals and uniques) with
-- the proxy named in `proxy`; a machine's has `machine` true and its reason; a direct
-- fetch has neither. So a dashboard tells the three apart:
--   person  NOT machine AND proxy IS NULL
--   proxied NOT machine AND proxy IS NOT NULL
--   machine machine
ALTER TABLE events ADD COLUMN proxy text;

-- People's events through a proxy, a part of human_total.
ALTER TABLE rollups ADD COLUMN proxied_total bigint NOT NULL DEFAULT 0;

-- The breakdown names the proxy of proxied events (dimension 'proxy'); their client is
-- the proxy's agent, not the reader's, so they are not in the 'client' rows.
ALTER TABLE rollup_breakdown DROP CONSTRAINT rollup_breakdown_dimension_check;
ALTER TABLE rollup_breakdown ADD CONSTRAINT rollup_breakdown_dimension_check
    CHECK (dimension IN ('reason', 'client', 'proxy'));

-- Existing rows: Gmail's and Yahoo's proxies were stored as machines. They become
-- proxied people, and the counts follow, here, from these rows only (no recount of the
-- rest): people's totals and breakdown, and people's uniques where one of these opens
-- is now the recipient's first person's event. Hours before the retention watermark
-- (months already pruned) are history and keep what they counted.
CREATE TEMPORARY TABLE proxied_now ON COMMIT DROP AS
WITH moved AS (
    UPDATE events
    SET machine = false, proxy = machine_reason, machine_reason = NULL
    WHERE machine AND machine_reason IN ('google_image_proxy', 'yahoo_proxy')
    RETURNING campaign, recipient, kind, url, occurred_at, proxy
)
SELECT campaign COLLATE "C" AS campaign, recipient COLLATE "C" AS recipient,
       kind COLLATE "C" AS kind, url COLLATE "C" AS url, occurred_at, proxy
FROM moved;

CREATE TEMPORARY TABLE proxied_scoped ON COMMIT DROP AS
SELECT campaign, recipient, kind, '' COLLATE "C" AS url, occurred_at, proxy FROM proxied_now
UNION ALL
SELECT campaign, recipient, kind, url, occurred_at, proxy FROM proxied_now
WHERE kind = 'click' AND url IS NOT NULL;

UPDATE rollups AS r
SET human_total = r.human_total + d.n, proxied_total = r.proxied_total + d.n
FROM (SELECT campaign, kind, url, date_trunc('hour', occurred_at, 'UTC') AS hour, count(*) AS n
      FROM proxied_scoped GROUP BY 1, 2, 3, 4) AS d
WHERE (r.campaign, r.kind, r.url_key, r.hour) = (d.campaign, d.kind, md5(d.url)::uuid, d.hour);

WITH d AS (
    SELECT campaign, kind, proxy, date_trunc('hour', occurred_at, 'UTC') AS hour, count(*) AS n
    FROM proxied_now GROUP BY 1, 2, 3, 4
),
was AS (
    UPDATE rollup_breakdown AS b SET total = b.total - d.n
    FROM d
    WHERE (b.campaign, b.kind, b.dimension, b.value, b.hour)
        = (d.campaign, d.kind, 'reason', d.proxy, d.hour)
)
INSERT INTO rollup_breakdown AS b (campaign, kind, dimension, value, hour, total)
SELECT campaign, kind, 'proxy', proxy, hour, n FROM d
ON CONFLICT (campaign, kind, dimension, value, hour) DO UPDATE
    SET total = b.total + EXCLUDED.total;

DELETE FROM rollup_breakdown WHERE total = 0;

WITH earliest AS (
    SELECT campaign, recipient, kind, url, min(occurred_at) AS at
    FROM proxied_scoped GROUP BY 1, 2, 3, 4
),
prior AS (
    SELECT f.campaign, f.recipient, f.kind, f.url, f.url_key, f.first_human_at AS was, e.at
    FROM first_events AS f
    JOIN earliest AS e
      ON (f.campaign, f.recipient, f.kind, f.url_key)
       = (e.campaign, e.recipient, e.kind, md5(e.url)::uuid)
    WHERE f.first_human_at IS NULL OR e.at < f.first_human_at
),
changed AS (
    UPDATE first_events AS f
    SET first_human_at = p.at
    FROM prior AS p
    WHERE (f.campaign, f.recipient, f.kind, f.url_key) = (p.campaign, p.recipient, p.kind, p.url_key)
    RETURNING p.campaign, p.kind, p.url, p.at AS now, p.was
),
deltas AS (
    SELECT campaign, kind, url, hour, sum(d) AS d
    FROM (SELECT campaign, kind, url, date_trunc('hour', was, 'UTC') AS hour, -1 AS d
          FROM changed WHERE was IS NOT NULL
          UNION ALL
          SELECT campaign, kind, url, date_trunc('hour', now, 'UTC'), 1 FROM changed) AS x
    GROUP BY 1, 2, 3, 4
)
UPDATE rollups AS r SET human_uniq = r.human_uniq + d.d
FROM deltas AS d
WHERE (r.campaign, r.kind, r.url_key, r.hour) = (d.campaign, d.kind, md5(d.url)::uuid, d.hour)
  AND d.d <> 0;

-- The views: the same columns, and the proxied share beside them (new columns last, as
-- CREATE OR REPLACE VIEW requires).
CREATE OR REPLACE VIEW campaign_summary AS
SELECT campaign, kind,
       sum(total)::bigint                 AS total,
       sum(uniq)::bigint                  AS unique_recipients,
       sum(human_total)::bigint           AS human_total,
       sum(human_uniq)::bigint            AS human_unique_recipients,
       sum(total - human_total)::bigint   AS machine_total,
       sum(proxied_total)::bigint         AS proxied_total
FROM rollups
WHERE url = ''
GROUP BY campaign, kind;

CREATE OR REPLACE VIEW campaign_links AS
SELECT campaign, url,
       sum(total)::bigint                 AS clicks,
       sum(uniq)::bigint                  AS unique_clickers,
       sum(human_total)::bigint           AS human_clicks,
       sum(human_uniq)::bigint            AS human_unique_clickers,
       sum(proxied_total)::bigint         AS proxied_clicks
FROM rollups
WHERE url <> '' AND kind = 'click'
GROUP BY campaign, url;

CREATE OR REPLACE VIEW campaign_days AS
SELECT campaign, (hour AT TIME ZONE 'UTC')::date AS day, kind,
       sum(total)::bigint                 AS total,
       sum(uniq)::bigint                  AS new_unique_recipients,
       sum(human_total)::bigint           AS human_total,
       sum(human_uniq)::bigint            AS new_human_unique_recipients,
       sum(proxied_total)::bigint         AS proxied_total
FROM rollups
WHERE url = ''
GROUP BY campaign, (hour AT TIME ZONE 'UTC')::date, kind;
