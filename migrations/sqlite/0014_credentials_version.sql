-- Processes cache API keys and logins; this one-row version tells them when
-- to drop them. Triggers move it in the transaction of any change to
-- `partners` or `api_keys`, whoever writes it (the service, the CLI, SQL by
-- hand), and every process reads it every 250 ms.
CREATE TABLE credentials_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO credentials_version (id, version) VALUES (1, 0);

CREATE TRIGGER partners_credentials_insert AFTER INSERT ON partners
BEGIN UPDATE credentials_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER partners_credentials_update AFTER UPDATE ON partners
BEGIN UPDATE credentials_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER partners_credentials_delete AFTER DELETE ON partners
BEGIN UPDATE credentials_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER api_keys_credentials_insert AFTER INSERT ON api_keys
BEGIN UPDATE credentials_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER api_keys_credentials_update AFTER UPDATE ON api_keys
BEGIN UPDATE credentials_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER api_keys_credentials_delete AFTER DELETE ON api_keys
BEGIN UPDATE credentials_version SET version = version + 1 WHERE id = 1; END;
