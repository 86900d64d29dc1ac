-- no-transaction
-- Anonymous users: see migrations/postgres/20261208000001_anonymous_users.sql. SQLite
-- cannot drop a NOT NULL, so the table is rebuilt (SQLite's documented procedure):
-- foreign keys off, so dropping the old table neither cascades into sessions nor
-- fails, and the other tables' references to "users" name the new table once it is
-- renamed. One transaction for the rebuild; a crash before COMMIT leaves the old table.
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;
CREATE TABLE users_rebuilt (
    id               TEXT PRIMARY KEY NOT NULL,
    email            TEXT CHECK (length(email) BETWEEN 3 AND 254),
    -- `Email::normalized`, computed in Rust: lookup, uniqueness and throttling agree.
    email_normalized TEXT,
    password_hash    TEXT NOT NULL,
    roles            TEXT NOT NULL DEFAULT '[]',
    disabled         BOOLEAN NOT NULL DEFAULT FALSE,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    email_verified   BOOLEAN NOT NULL DEFAULT FALSE,
    last_login_at    INTEGER
) WITHOUT ROWID;
INSERT INTO users_rebuilt (id, email, email_normalized, password_hash, roles, disabled,
                           created_at, updated_at, email_verified, last_login_at)
SELECT id, email, email_normalized, password_hash, roles, disabled,
       created_at, updated_at, email_verified, last_login_at
FROM users;
DROP TABLE users;
ALTER TABLE users_rebuilt RENAME TO users;
CREATE UNIQUE INDEX users_email_normalized_key ON users (email_normalized);
CREATE INDEX users_anonymous_created_at_idx ON users (created_at) WHERE email IS NULL;
COMMIT;
PRAGMA foreign_keys = ON;
