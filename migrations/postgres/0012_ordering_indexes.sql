-- The events of a key that can hold it (not processed), so a claim's
-- check for an earlier one reads those only, not the key's whole history.
-- Its predicate is repeated word for word in the check
-- (store/sql/statement.rs::key_holders), which is what lets the planners
-- use it.
CREATE INDEX events_order_open ON events(order_key, id)
  WHERE order_key IS NOT NULL AND status IN ('received', 'retrying', 'processing', 'dead_lettered');
-- The parked events of a key (a finished event's release looks for them).
CREATE INDEX events_blocked_key ON events(order_key) WHERE blocked_by IS NOT NULL;
-- It replaces the index of every event of a key, which nothing else reads.
DROP INDEX IF EXISTS events_order;
