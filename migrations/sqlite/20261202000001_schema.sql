-- The embedded backend's schema: the same tables as migrations/postgres/ (as they stand
-- after its last migration), written for SQLite. Differences, so that `tessera copy`
-- and the store agree:
-- - ids are TEXT (a UUID in its hyphenated lower-case form);
-- - times are INTEGER microseconds since the Unix epoch (UTC), taken from the process
--   clock inside the write transaction (one process, one clock);
-- - roles is TEXT holding a JSON array of strings, audit detail a JSON object;
-- - audit ids are AUTOINCREMENT, so they only grow (the audit cursor relies on it);
-- - tables keyed by an id or a hash are WITHOUT ROWID (one B-tree per lookup, not an
--   index and then the table).

CREATE TABLE users (
    id               TEXT PRIMARY KEY NOT NULL,
    email            TEXT NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    -- `Email::normalized`, computed in Rust: lookup, uniqueness and throttling agree.
    email_normalized TEXT NOT NULL,
    password_hash    TEXT NOT NULL,
    roles            TEXT NOT NULL DEFAULT '[]',
    disabled         BOOLEAN NOT NULL DEFAULT FALSE,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX users_email_normalized_key ON users (email_normalized);

-- A session is the chain of refresh tokens that one login started.
CREATE TABLE sessions (
    id               TEXT PRIMARY KEY NOT NULL,
    user_id          TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    remember_me      BOOLEAN NOT NULL,
    created_at       INTEGER NOT NULL,
    last_used_at     INTEGER NOT NULL,
    -- absolute end of the session
    expires_at       INTEGER NOT NULL,
    revoked_at       INTEGER,
    revoked_reason   TEXT,
    login_ip         TEXT,
    login_user_agent TEXT,
    last_ip          TEXT,
    last_user_agent  TEXT,
    -- rotations so far, and SHA-256 of the chain secret (see migrations/postgres/)
    generation       INTEGER NOT NULL DEFAULT 0,
    chain_hash       BLOB
) WITHOUT ROWID;
CREATE INDEX sessions_user_id_idx ON sessions (user_id, last_used_at);
CREATE INDEX sessions_revoked_at_idx ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX sessions_expires_at_idx ON sessions (expires_at);
CREATE INDEX sessions_last_used_at_idx ON sessions (last_used_at);

-- SHA-256 of each refresh token; the successor sealed under a key derived from this
-- token's plaintext (see migrations/postgres/20261122000001_core.sql).
CREATE TABLE refresh_tokens (
    token_hash       BLOB PRIMARY KEY NOT NULL,
    session_id       TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at       INTEGER NOT NULL,
    rotated_at       INTEGER,
    successor_hash   BLOB,
    successor_sealed BLOB
) WITHOUT ROWID;
CREATE INDEX refresh_tokens_session_id_idx ON refresh_tokens (session_id);

-- Never holds a password, a token or a hash.
CREATE TABLE audit_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    occurred_at INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    user_id     TEXT,
    session_id  TEXT,
    actor_id    TEXT,
    ip          TEXT,
    user_agent  TEXT,
    detail      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_user_id_idx ON audit_events (user_id, id);
CREATE INDEX audit_events_actor_id_idx ON audit_events (actor_id, id) WHERE actor_id IS NOT NULL;
CREATE INDEX audit_events_occurred_at_idx ON audit_events (occurred_at);

-- Known devices (SHA-256 of each device token).
CREATE TABLE devices (
    token_hash   BLOB PRIMARY KEY NOT NULL,
    user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX devices_user_id_idx ON devices (user_id);
CREATE INDEX devices_expires_at_idx ON devices (expires_at);

-- Revocation marks the database does not otherwise hold, for the in-process revocation
-- backend (see migrations/postgres/20261201000004_revocation_marks.sql).
CREATE TABLE revocation_marks (
    key        TEXT PRIMARY KEY NOT NULL,
    value      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX revocation_marks_expires_at_idx ON revocation_marks (expires_at);
