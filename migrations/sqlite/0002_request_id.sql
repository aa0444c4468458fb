-- The X-Request-Id of the request that created the event, so its logs can be followed into the worker.
ALTER TABLE events ADD COLUMN request_id TEXT;
