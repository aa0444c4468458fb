-- Lists are keyset-paged newest first under any combination of the partner,
-- type and status filters; each combination has an index that ends in the
-- id, and a list without a status filter reads one range per status and
-- merges them (see `list_events`). Time windows become id ranges (an id's
-- time is its event's received_at).
DROP INDEX events_partner;
DROP INDEX events_tipo;
CREATE INDEX events_partner_status ON events(partner_id, status, id);
CREATE INDEX events_tipo_status ON events(tipo, status, id);
CREATE INDEX events_partner_tipo_status ON events(partner_id, tipo, status, id);
