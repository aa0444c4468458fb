-- Retention, statistics from counters, idempotency keys of their own.
--
-- Idempotency keys move to a table of their own: they live exactly as long as
-- their event (the purge removes both), and a key stays unique however the
-- events are stored.
CREATE TABLE idempotency_keys (
    partner_id      TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    -- hash of the request that created the event: a replay or a conflict
    request_hash    TEXT NOT NULL,
    PRIMARY KEY (partner_id, idempotency_key)
);
CREATE INDEX idempotency_keys_event ON idempotency_keys(event_id);
INSERT INTO idempotency_keys (partner_id, idempotency_key, event_id, request_hash)
    SELECT partner_id, idempotency_key, id, COALESCE(request_hash, '') FROM events
    WHERE idempotency_key IS NOT NULL;
DROP INDEX events_idempotency;
ALTER TABLE events DROP COLUMN request_hash;

-- The status an event was claimed from, so a claim can move its counter.
ALTER TABLE events ADD COLUMN prior_status TEXT;

-- Statistics are read from counters, not from the events: the percentiles'
-- index goes; the purge finds expired events by status and the time they
-- reached it (updated_at: terminal events are not updated again).
DROP INDEX events_processing_ms;
CREATE INDEX events_expiry ON events(status, updated_at);
-- Events per (received minute, partner, type) by current status, and the
-- processing times of the processed ones in fixed buckets (upper bounds in
-- milliseconds; ms_inf is everything above the last bound). Old minutes are
-- rolled up into hours and days (width). Each group-committed writer keeps
-- rows of its own (writer), so two writers never wait on one row; readers sum.
CREATE TABLE event_counts (
    bucket     BIGINT NOT NULL,
    width      BIGINT NOT NULL,
    partner_id TEXT NOT NULL,
    tipo       TEXT NOT NULL,
    writer     BIGINT NOT NULL,
    received       BIGINT NOT NULL DEFAULT 0,
    processing     BIGINT NOT NULL DEFAULT 0,
    retrying       BIGINT NOT NULL DEFAULT 0,
    processed      BIGINT NOT NULL DEFAULT 0,
    dead_lettered  BIGINT NOT NULL DEFAULT 0,
    ms_sum         BIGINT NOT NULL DEFAULT 0,
    ms_le_5        BIGINT NOT NULL DEFAULT 0,
    ms_le_10       BIGINT NOT NULL DEFAULT 0,
    ms_le_25       BIGINT NOT NULL DEFAULT 0,
    ms_le_50       BIGINT NOT NULL DEFAULT 0,
    ms_le_100      BIGINT NOT NULL DEFAULT 0,
    ms_le_250      BIGINT NOT NULL DEFAULT 0,
    ms_le_500      BIGINT NOT NULL DEFAULT 0,
    ms_le_1000     BIGINT NOT NULL DEFAULT 0,
    ms_le_2500     BIGINT NOT NULL DEFAULT 0,
    ms_le_5000     BIGINT NOT NULL DEFAULT 0,
    ms_le_10000    BIGINT NOT NULL DEFAULT 0,
    ms_le_30000    BIGINT NOT NULL DEFAULT 0,
    ms_le_60000    BIGINT NOT NULL DEFAULT 0,
    ms_le_300000   BIGINT NOT NULL DEFAULT 0,
    ms_le_900000   BIGINT NOT NULL DEFAULT 0,
    ms_le_3600000  BIGINT NOT NULL DEFAULT 0,
    ms_inf         BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket, width, partner_id, tipo, writer)
);
CREATE INDEX event_counts_partner ON event_counts(partner_id, bucket);
-- The events already stored, counted once, in rows as wide as a roll-up would
-- have made them by now (minutes for the last two hours, hours for the last
-- two days, days before).
INSERT INTO event_counts (bucket, width, partner_id, tipo, writer, received, processing, retrying, processed, dead_lettered, ms_sum, ms_le_5, ms_le_10, ms_le_25, ms_le_50, ms_le_100, ms_le_250, ms_le_500, ms_le_1000, ms_le_2500, ms_le_5000, ms_le_10000, ms_le_30000, ms_le_60000, ms_le_300000, ms_le_900000, ms_le_3600000, ms_inf)
SELECT (received_at / w) * w, w, partner_id, tipo, 0,
    CAST(SUM(CASE WHEN status = 'received' THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processing' THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'retrying' THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'dead_lettered' THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' THEN COALESCE(processing_ms, 0) ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms <= 5 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 5 AND processing_ms <= 10 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 10 AND processing_ms <= 25 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 25 AND processing_ms <= 50 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 50 AND processing_ms <= 100 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 100 AND processing_ms <= 250 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 250 AND processing_ms <= 500 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 500 AND processing_ms <= 1000 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 1000 AND processing_ms <= 2500 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 2500 AND processing_ms <= 5000 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 5000 AND processing_ms <= 10000 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 10000 AND processing_ms <= 30000 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 30000 AND processing_ms <= 60000 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 60000 AND processing_ms <= 300000 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 300000 AND processing_ms <= 900000 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 900000 AND processing_ms <= 3600000 THEN 1 ELSE 0 END) AS BIGINT),
    CAST(SUM(CASE WHEN status = 'processed' AND processing_ms IS NOT NULL AND processing_ms > 3600000 THEN 1 ELSE 0 END) AS BIGINT)
FROM (SELECT e.*, CASE WHEN e.received_at >= CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT) - 7200000 THEN 60000
                   WHEN e.received_at >= CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT) - 172800000 THEN 3600000
                   ELSE 86400000 END AS w FROM events e) x
GROUP BY (received_at / w) * w, w, partner_id, tipo;

-- Background tasks that one process of a cluster runs at a time (the
-- purge): who holds the lease, until when, and the last run's report (JSON).
CREATE TABLE maintenance (
    task        TEXT PRIMARY KEY,
    holder      TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0,
    last_run    TEXT
);
