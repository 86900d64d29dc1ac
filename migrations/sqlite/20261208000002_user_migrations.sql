-- User migrations: see migrations/postgres/20261208000002_user_migrations.sql.
CREATE TABLE user_migrations (
    version    INTEGER PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    checksum   BLOB NOT NULL,
    applied_at INTEGER NOT NULL
);
