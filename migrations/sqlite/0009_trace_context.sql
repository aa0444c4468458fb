-- The event's W3C trace context (the partner's traceparent/tracestate, or
-- the one the service started at ingest): every attempt, retry and
-- delivery of the event continues that trace.
ALTER TABLE events ADD COLUMN traceparent TEXT;
ALTER TABLE events ADD COLUMN tracestate TEXT;
