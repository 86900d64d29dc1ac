-- Revocation marks the database does not otherwise hold, kept for the in-process
-- revocation backend (no Redis): per-user cut-offs (a role change, a disable, the end of
-- all sessions; value = Unix ms) and single access tokens (`/revoke`; value = 1). Ended
-- sessions need no row: `sessions.revoked_at` says when. On start the backend reloads
-- every live mark, so a restart never brings a revoked access token back. Rows expire
-- with the last access token they cover and the cleanup deletes them.
CREATE TABLE revocation_marks (
    key        text PRIMARY KEY,
    value      bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX revocation_marks_expires_at_idx ON revocation_marks (expires_at);
