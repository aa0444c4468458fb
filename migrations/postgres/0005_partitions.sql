-- The event tables are partitioned by event id: ids are ULIDs, whose first
-- ten characters are the time the event was received, so a range of ids is
-- a range of time. The service creates a partition per period ahead of time
-- and drops whole partitions once their events have expired (the few events
-- such a partition must still keep move to the default partition first).
-- Every row stored before this migration, and any id outside every range,
-- lives in the default partition (`events_kept`, …), purged row by row.
--
-- Ids compare byte by byte (COLLATE "C"), as ULIDs sort.

ALTER TABLE events RENAME TO events_kept;
ALTER INDEX events_pkey RENAME TO events_kept_pkey;
DROP INDEX events_partner;
DROP INDEX events_tipo;
DROP INDEX events_status;
DROP INDEX events_expiry;
ALTER TABLE events_kept ALTER COLUMN id TYPE TEXT COLLATE "C";
CREATE TABLE events (LIKE events_kept INCLUDING DEFAULTS) PARTITION BY RANGE (id);
ALTER TABLE events ATTACH PARTITION events_kept DEFAULT;
ALTER TABLE events ADD PRIMARY KEY (id);
-- Lists: one index per combination of the partner, type and status filters,
-- each ending in the id (see the SQLite migration 0005).
CREATE INDEX events_status ON events(status, id);
CREATE INDEX events_partner_status ON events(partner_id, status, id);
CREATE INDEX events_tipo_status ON events(tipo, status, id);
CREATE INDEX events_partner_tipo_status ON events(partner_id, tipo, status, id);
CREATE INDEX events_expiry ON events(status, updated_at);

ALTER TABLE attempts RENAME TO attempts_kept;
ALTER INDEX attempts_pkey RENAME TO attempts_kept_pkey;
ALTER TABLE attempts_kept ALTER COLUMN event_id TYPE TEXT COLLATE "C";
CREATE TABLE attempts (LIKE attempts_kept INCLUDING DEFAULTS) PARTITION BY RANGE (event_id);
ALTER TABLE attempts ATTACH PARTITION attempts_kept DEFAULT;
ALTER TABLE attempts ADD PRIMARY KEY (event_id, attempt);

ALTER TABLE deliveries RENAME TO deliveries_kept;
ALTER INDEX deliveries_pkey RENAME TO deliveries_kept_pkey;
ALTER TABLE deliveries_kept ALTER COLUMN event_id TYPE TEXT COLLATE "C";
CREATE TABLE deliveries (LIKE deliveries_kept INCLUDING DEFAULTS) PARTITION BY RANGE (event_id);
ALTER TABLE deliveries ATTACH PARTITION deliveries_kept DEFAULT;
ALTER TABLE deliveries ADD PRIMARY KEY (event_id, destination);

ALTER TABLE idempotency_keys ALTER COLUMN event_id TYPE TEXT COLLATE "C";

-- The time partitions: [lo, hi) in epoch milliseconds; partition `events_p<lo>`
-- (and `attempts_p<lo>`, `deliveries_p<lo>`) holds the ids of that range.
CREATE TABLE event_partitions (
    lo BIGINT PRIMARY KEY,
    hi BIGINT NOT NULL
);
