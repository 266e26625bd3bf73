-- Retention: events become a table partitioned by month of occurred_at, so old months
-- are dropped whole (`trackbuf prune`) instead of by a long DELETE. The primary key
-- must hold the partition column: (event_id, occurred_at). occurred_at is stamped at
-- ingest with the event_id (a UUIDv7 from the same clock), so a redelivered event has
-- both the same and `ON CONFLICT (event_id, occurred_at)` still skips it.
--
-- Partitions are named events_pYYYYMM and cover one UTC month. A DEFAULT partition
-- takes an event no month partition covers, so no insert is ever refused.

-- Create the partition for the UTC month holding `month`, if missing. Rows the DEFAULT
-- partition holds for that month are moved into it first (attaching would otherwise
-- fail on them). Returns the new partition's name, or NULL when it existed.
CREATE FUNCTION trackbuf_event_partition(month timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    lo   timestamptz := date_trunc('month', month AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi   timestamptz := (date_trunc('month', month AT TIME ZONE 'UTC') + interval '1 month')
                        AT TIME ZONE 'UTC';
    part text := 'events_p' || to_char(month AT TIME ZONE 'UTC', 'YYYYMM');
BEGIN
    -- Serialise creators (consumers at start and hourly, migrate, several at once).
    PERFORM pg_advisory_xact_lock(7627263931);
    IF to_regclass(part) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   part);
    IF to_regclass('events_default') IS NOT NULL THEN
        EXECUTE format('WITH moved AS (DELETE FROM events_default WHERE occurred_at >= %L'
                       ' AND occurred_at < %L RETURNING *) INSERT INTO %I SELECT * FROM moved',
                       lo, hi, part);
    END IF;
    EXECUTE format('ALTER TABLE events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part, lo, hi);
    RETURN part;
END
$$;

-- The DEFAULT partition, the current UTC month and `ahead` months after it; returns the
-- partitions created. Called by this migration, by `trackbuf migrate`, and by every
-- consumer at start and hourly, so a month's partition exists well before its events.
CREATE FUNCTION trackbuf_ensure_event_partitions(ahead int DEFAULT 2) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    made text;
BEGIN
    PERFORM pg_advisory_xact_lock(7627263931);
    IF to_regclass('events_default') IS NULL THEN
        CREATE TABLE events_default PARTITION OF events DEFAULT;
        RETURN NEXT 'events_default';
    END IF;
    FOR i IN 0..ahead LOOP
        made := trackbuf_event_partition(now() + make_interval(months => i));
        IF made IS NOT NULL THEN
            RETURN NEXT made;
        END IF;
    END LOOP;
END
$$;

-- Convert the existing table in place, in this migration's one transaction: every row
-- is copied once, the counts are compared, then the old table goes. Columns are taken
-- from the old table as it is (LIKE), so columns added by earlier migrations stay, and
-- so do its other indexes (recreated from their definitions).
DO $$
DECLARE
    index_defs text[];
    idx record;
    old_rows bigint;
    new_rows bigint;
    month timestamptz;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'events'::regclass) THEN
        RETURN;
    END IF;
    SELECT coalesce(array_agg(pg_get_indexdef(i.indexrelid)), '{}') INTO index_defs
    FROM pg_index i WHERE i.indrelid = 'events'::regclass AND NOT i.indisprimary;
    ALTER TABLE events RENAME TO events_old;
    -- Index names share one namespace with tables: free them for the new table's.
    FOR idx IN SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE i.indrelid = 'events_old'::regclass LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', idx.relname, 'old_' || idx.relname);
    END LOOP;
    CREATE TABLE events (LIKE events_old INCLUDING DEFAULTS INCLUDING CONSTRAINTS
                         INCLUDING COMMENTS)
        PARTITION BY RANGE (occurred_at);
    ALTER TABLE events ADD PRIMARY KEY (event_id, occurred_at);
    FOR i IN 1..coalesce(array_length(index_defs, 1), 0) LOOP
        EXECUTE index_defs[i];  -- "CREATE INDEX <its name> ON <schema>.events ..."
    END LOOP;
    PERFORM trackbuf_ensure_event_partitions(2);
    -- A partition for every month that holds rows (not for the empty months between).
    FOR month IN SELECT DISTINCT date_trunc('month', occurred_at AT TIME ZONE 'UTC')
                                 AT TIME ZONE 'UTC'
                 FROM events_old LOOP
        PERFORM trackbuf_event_partition(month);
    END LOOP;
    INSERT INTO events SELECT * FROM events_old;
    SELECT count(*) INTO old_rows FROM events_old;
    SELECT count(*) INTO new_rows FROM events;
    IF old_rows <> new_rows THEN
        RAISE EXCEPTION 'events partitioning: % rows copied of %, nothing changed',
            new_rows, old_rows;
    END IF;
    DROP TABLE events_old;
END
$$;
