-- The sweeper's reads: per unfinished status waiting for a task, the events
-- by when they were last queued, so a sweep reads only those not queued
-- since its bound (not every event of a long backlog, nor the history).
-- One partial index per status, as SQLite uses a partial index only when
-- the query repeats its condition.
CREATE INDEX events_received_queued ON events(queued_at) WHERE status = 'received';
CREATE INDEX events_retrying_queued ON events(queued_at) WHERE status = 'retrying';
-- Windowed statistics: one range per width (the primary key starts with
-- the bucket, so a day-wide range also walked every minute of that day).
CREATE INDEX event_counts_window ON event_counts(width, bucket);
