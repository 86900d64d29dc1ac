-- User migrations (issue 16): the files of users.migrations_dir that `tessera migrate`
-- has applied, each once, in order, with the SHA-256 of its content: an applied file
-- that was edited afterwards is an error that names it.
CREATE TABLE user_migrations (
    version    bigint PRIMARY KEY,
    name       text NOT NULL,
    checksum   bytea NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
