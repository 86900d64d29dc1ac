-- Second factor: see migrations/postgres/20261208000004_mfa.sql.
CREATE TABLE mfa_totp (
    user_id       TEXT PRIMARY KEY NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    secret_sealed BLOB NOT NULL,
    created_at    INTEGER NOT NULL,
    confirmed_at  INTEGER,
    last_step     INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE mfa_recovery_codes (
    user_id   TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash BLOB NOT NULL,
    used_at   INTEGER,
    PRIMARY KEY (user_id, code_hash)
) WITHOUT ROWID;

CREATE TABLE mfa_challenges (
    token_hash    BLOB PRIMARY KEY NOT NULL,
    user_id       TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    password_hash TEXT NOT NULL,
    remember_me   BOOLEAN NOT NULL,
    cookie        BOOLEAN NOT NULL,
    device_sealed BLOB NOT NULL,
    failures      INTEGER NOT NULL DEFAULT 0,
    expires_at    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX mfa_challenges_expires_at_idx ON mfa_challenges (expires_at);
