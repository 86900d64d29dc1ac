-- Accounts and email: see migrations/postgres/20261207000001_email.sql.

ALTER TABLE users ADD COLUMN email_verified BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE users ADD COLUMN last_login_at INTEGER;

CREATE TABLE email_tokens (
    token_hash           BLOB PRIMARY KEY NOT NULL,
    user_id              TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind                 TEXT NOT NULL,
    new_email            TEXT,
    new_email_normalized TEXT,
    created_at           INTEGER NOT NULL,
    expires_at           INTEGER NOT NULL,
    used_at              INTEGER
) WITHOUT ROWID;
CREATE INDEX email_tokens_user_id_idx ON email_tokens (user_id, kind);
CREATE INDEX email_tokens_expires_at_idx ON email_tokens (expires_at);

-- One writer claims rows under a lease (`claimed_until`), as SKIP LOCKED does on
-- PostgreSQL; ids only grow (AUTOINCREMENT), so rows go out in the order written.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL,
    user_id         TEXT,
    payload         BLOB NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    claimed_until   INTEGER
);
CREATE INDEX outbox_next_attempt_at_idx ON outbox (next_attempt_at);
CREATE INDEX outbox_user_id_idx ON outbox (user_id) WHERE user_id IS NOT NULL;
