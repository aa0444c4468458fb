-- Processes cache API keys and logins; this one-row version tells them when
-- to drop them. Triggers move it in the transaction of any change to
-- `partners` or `api_keys`, whoever writes it (the service, the CLI, SQL by
-- hand), and every process reads it every 250 ms.
CREATE TABLE credentials_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO credentials_version (id, version) VALUES (1, 0);

CREATE FUNCTION bump_credentials_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE credentials_version SET version = version + 1 WHERE id = 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER partners_credentials_version
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON partners
    FOR EACH STATEMENT EXECUTE FUNCTION bump_credentials_version();
CREATE TRIGGER api_keys_credentials_version
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION bump_credentials_version();
