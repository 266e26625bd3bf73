-- Erasure (`trackbuf forget`): a tombstone per person (and campaign) whose rows were
-- deleted. The consumer's inserts skip every event, and every dead letter, that a live
-- tombstone matches, so events still queued in beanstalkd or spooled by ingest when
-- the rows were deleted are never stored afterwards.
CREATE TABLE forgotten (
    recipient    text        NOT NULL,
    -- NULL: every campaign. Campaigns are never empty (links refuse them), so '' below
    -- cannot stand for a real campaign.
    campaign     text,
    forgotten_at timestamptz NOT NULL DEFAULT now(),
    -- Past this the tombstone no longer drops events and is deleted (by `forget` and
    -- by the consumer): it must outlive any queue backlog and ingest spool.
    keep_until   timestamptz NOT NULL
);

-- One tombstone per (recipient, campaign or all); the consumer's per-event check
-- looks it up by recipient.
CREATE UNIQUE INDEX forgotten_recipient_campaign ON forgotten (recipient, (coalesce(campaign, '')));

-- Does a stored body (a dead letter: a job, one event's JSON, or bytes that are not
-- JSON at all) hold an event of this recipient (in this campaign, when one is given)?
-- JSON is searched at every depth for an object whose "r" (and "c") match, so a job
-- frame, a lone event and a malformed frame are all covered; bytes that are not JSON
-- match when they contain the recipient (and campaign) as a JSON string.
CREATE FUNCTION trackbuf_body_mentions(body bytea, who text, camp text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    doc jsonb;
BEGIN
    BEGIN
        doc := convert_from(body, 'UTF8')::jsonb;
    EXCEPTION WHEN OTHERS THEN
        RETURN position(convert_to(to_json(who)::text, 'UTF8') IN body) > 0
           AND (camp IS NULL OR position(convert_to(to_json(camp)::text, 'UTF8') IN body) > 0);
    END;
    RETURN jsonb_path_exists(
        doc, '$.** ? (@.r == $r && ($c == null || @.c == $c))',
        jsonb_build_object('r', who, 'c', camp));
END
$$;
