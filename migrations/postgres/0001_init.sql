-- Timestamps are epoch milliseconds (BIGINT); JSON documents are TEXT.
-- The same column types exist in the PostgreSQL schema so one set of queries serves both.
CREATE TABLE partners (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    password_hash   TEXT,
    rate_per_minute BIGINT,
    burst           BIGINT,
    created_at      BIGINT NOT NULL,
    disabled_at     BIGINT
);

CREATE TABLE api_keys (
    key_hash    TEXT PRIMARY KEY,
    partner_id  TEXT NOT NULL REFERENCES partners(id),
    prefix      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
CREATE INDEX api_keys_partner ON api_keys(partner_id);

CREATE TABLE events (
    id               TEXT PRIMARY KEY,
    partner_id       TEXT NOT NULL,
    tipo             TEXT NOT NULL,
    dados            TEXT NOT NULL,
    meta             TEXT NOT NULL,
    pipeline_version TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    -- attempts made before the last manual retry; the retry budget counts from here
    attempt_base     BIGINT NOT NULL DEFAULT 0,
    received_at      BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    next_attempt_at  BIGINT,
    lease_until      BIGINT,
    queued_at        BIGINT,
    processed_at     BIGINT,
    processing_ms    BIGINT,
    last_error       TEXT,
    last_trace       TEXT,
    result           TEXT,
    idempotency_key  TEXT,
    request_hash     TEXT
);
CREATE UNIQUE INDEX events_idempotency ON events(partner_id, idempotency_key);
CREATE INDEX events_partner ON events(partner_id, id);
CREATE INDEX events_status ON events(status, id);
CREATE INDEX events_tipo ON events(tipo, id);
CREATE INDEX events_processing_ms ON events(processing_ms);

CREATE TABLE attempts (
    event_id     TEXT NOT NULL,
    attempt      BIGINT NOT NULL,
    finished_at  BIGINT NOT NULL,
    outcome      TEXT NOT NULL,
    error        TEXT,
    trace        TEXT NOT NULL,
    PRIMARY KEY (event_id, attempt)
);

CREATE TABLE deliveries (
    event_id     TEXT NOT NULL,
    destination  TEXT NOT NULL,
    delivered_at BIGINT NOT NULL,
    status_code  BIGINT,
    PRIMARY KEY (event_id, destination)
);
