-- Classification kept on every event, and rollups maintained by the insert itself.
--
-- New columns are NULL for events stored before this migration: classifying them
-- needs the Python rules (ua-parser), not SQL, so nothing is backfilled here and the
-- rollups start empty; `trackbuf rollups rebuild` classifies old rows and recounts.
-- Adding nullable columns without a default rewrites nothing, so this is instant.
ALTER TABLE events
    ADD COLUMN machine        boolean,
    ADD COLUMN machine_reason text,
    ADD COLUMN client         text;

-- The first event of each recipient: per campaign (url = '') and per link (url = the
-- click URL), for any event and for people's events. An insert that adds a row here
-- is a "unique"; one that conflicts is a repeat. The recipient comes before kind and
-- url so the burst rule finds one recipient's recent clicks with one index range.
-- Keys are COLLATE "C" (byte order) here and in the rollups: nothing needs them in
-- linguistic order, and under a locale's collation every B-tree comparison calls
-- strcoll; measured ~15% of the insert's cost.
CREATE TABLE first_events (
    campaign       text COLLATE "C" NOT NULL,
    recipient      text COLLATE "C" NOT NULL,
    kind           text COLLATE "C" NOT NULL,
    url            text COLLATE "C" NOT NULL,
    -- Keys hold a digest of the URL, not the URL: a click URL can be longer than a
    -- B-tree entry may be (~2.7 kB), and such a click must still be stored and counted.
    url_key        uuid GENERATED ALWAYS AS (md5(url)::uuid) STORED,
    first_at       timestamptz NOT NULL,
    -- NULL until this recipient's first event here that is not a machine's.
    first_human_at timestamptz,
    -- Set when a person's first event came after a machine's (a later upsert), so the
    -- insert can tell "new human unique" from "new unique" in what it gets back.
    human_later    boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (campaign, recipient, kind, url_key)
);

-- Counts per campaign (url = '') or per link, per kind, per UTC hour. Hours rather
-- than days, so a report can group them into days of any time zone with whole-hour
-- offsets. "uniq" counts recipients whose first event fell in that hour: summing
-- hours gives the campaign's unique recipients.
CREATE TABLE rollups (
    campaign    text COLLATE "C" NOT NULL,
    kind        text COLLATE "C" NOT NULL,
    url         text COLLATE "C" NOT NULL,
    url_key     uuid GENERATED ALWAYS AS (md5(url)::uuid) STORED,
    hour        timestamptz NOT NULL,
    total       bigint      NOT NULL,
    uniq        bigint      NOT NULL,
    human_total bigint      NOT NULL,
    human_uniq  bigint      NOT NULL,
    PRIMARY KEY (campaign, kind, url_key, hour)
);

-- Machine events by reason, and people's events by mail client or browser.
CREATE TABLE rollup_breakdown (
    campaign  text COLLATE "C" NOT NULL,
    kind      text COLLATE "C" NOT NULL,
    dimension text COLLATE "C" NOT NULL CHECK (dimension IN ('reason', 'client')),
    value     text COLLATE "C" NOT NULL,
    hour      timestamptz NOT NULL,
    total     bigint      NOT NULL,
    PRIMARY KEY (campaign, kind, dimension, value, hour)
);

-- The shapes for dashboards and scripts. Days are UTC days; for another time zone
-- group `rollups.hour` yourself (as `trackbuf stats --by day --tz` does).
CREATE VIEW campaign_summary AS
SELECT campaign, kind,
       sum(total)::bigint                 AS total,
       sum(uniq)::bigint                  AS unique_recipients,
       sum(human_total)::bigint           AS human_total,
       sum(human_uniq)::bigint            AS human_unique_recipients,
       sum(total - human_total)::bigint   AS machine_total
FROM rollups
WHERE url = ''
GROUP BY campaign, kind;

CREATE VIEW campaign_links AS
SELECT campaign, url,
       sum(total)::bigint                 AS clicks,
       sum(uniq)::bigint                  AS unique_clickers,
       sum(human_total)::bigint           AS human_clicks,
       sum(human_uniq)::bigint            AS human_unique_clickers
FROM rollups
WHERE url <> '' AND kind = 'click'
GROUP BY campaign, url;

CREATE VIEW campaign_days AS
SELECT campaign, (hour AT TIME ZONE 'UTC')::date AS day, kind,
       sum(total)::bigint                 AS total,
       sum(uniq)::bigint                  AS new_unique_recipients,
       sum(human_total)::bigint           AS human_total,
       sum(human_uniq)::bigint            AS new_human_unique_recipients
FROM rollups
WHERE url = ''
GROUP BY campaign, (hour AT TIME ZONE 'UTC')::date, kind;
