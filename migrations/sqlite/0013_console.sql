-- The operator console: operator accounts (argon2id passwords) and signed-in
-- sessions. A session is found by the SHA-256 of its cookie (the cookie
-- itself is never stored). `operator` is NULL for a session signed in with
-- the admin key; `credential` is a fingerprint of the admin key or of the
-- operator's password hash then in force, so a changed key or password, or a
-- removed operator, ends the session.
CREATE TABLE operators (
    name          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL
);

CREATE TABLE console_sessions (
    token_hash  TEXT PRIMARY KEY,
    operator    TEXT,
    credential  TEXT NOT NULL,
    csrf        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL
);
CREATE INDEX console_sessions_seen ON console_sessions(seen_at);
