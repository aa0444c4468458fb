-- Ordering keys. `order_key` is a digest of (type, partner, key value) for
-- the events of a pipeline with `ordering`; `order_block` is 1 when a dead
-- letter holds its key (`on_dead_letter: block`). An event whose claim
-- found an earlier one of its key unfinished is parked (queued_at = -1)
-- with `blocked_by` naming that one, until the key is released.
ALTER TABLE events ADD COLUMN order_key TEXT;
ALTER TABLE events ADD COLUMN order_block INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN blocked_by TEXT;
-- The events of a key in acceptance order (claims look for earlier ones).
CREATE INDEX events_order ON events(order_key, id) WHERE order_key IS NOT NULL;
-- The parked ones, for the release and its counts.
CREATE INDEX events_blocked ON events(tipo, id) WHERE blocked_by IS NOT NULL;
