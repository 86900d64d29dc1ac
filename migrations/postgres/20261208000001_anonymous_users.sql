-- Anonymous users (issue 16): a user made by POST /users/anonymous has no email until
-- it is converted by POST /users (same id). Unique indexes let any number of NULLs in.
-- The partial index serves the cleanup of unconverted ones
-- (cleanup.anonymous_retention_secs).
ALTER TABLE users ALTER COLUMN email DROP NOT NULL;
ALTER TABLE users ALTER COLUMN email_normalized DROP NOT NULL;
CREATE INDEX users_anonymous_created_at_idx ON users (created_at) WHERE email IS NULL;
