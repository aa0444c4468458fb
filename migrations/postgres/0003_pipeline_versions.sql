-- Every pipeline version the service has loaded, with the files it was made
-- of (JSON object: path -> content), so events run with the version they were
-- accepted with across restarts and reloads.
CREATE TABLE pipeline_versions (
    version    TEXT PRIMARY KEY,
    tipo       TEXT NOT NULL,
    sources    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
