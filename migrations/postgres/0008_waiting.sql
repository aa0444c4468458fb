-- Events waiting on a destination (open circuit, throttling): which one,
-- since when (for its max_wait). A parked event (queued_at = -1) waits for a
-- circuit to close and has no queue task: the service wakes it, oldest
-- first. The index holds only waiting events, with what the waker reads
-- of them (counts per destination and the oldest wait).
ALTER TABLE events ADD COLUMN waiting_on TEXT;
ALTER TABLE events ADD COLUMN waiting_since BIGINT;
CREATE INDEX events_waiting ON events(tipo, waiting_on, queued_at, id, waiting_since) WHERE waiting_on IS NOT NULL;
