-- Sessions and account security: who performed an admin action, and indexes that let
-- the periodic cleanup find ended sessions and old audit rows without scanning.

-- The user an event is about stays in user_id; for admin actions actor_id is the admin.
ALTER TABLE audit_events ADD COLUMN actor_id uuid;
CREATE INDEX audit_events_actor_id_idx ON audit_events (actor_id, id DESC)
    WHERE actor_id IS NOT NULL;
-- Rows are appended in time order, so a BRIN index is tiny and enough for retention.
CREATE INDEX audit_events_occurred_at_idx ON audit_events USING brin (occurred_at);

-- A session ends by revocation, by its absolute expiry or by idling; one index each.
CREATE INDEX sessions_revoked_at_idx ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX sessions_expires_at_idx ON sessions (expires_at);
CREATE INDEX sessions_last_used_at_idx ON sessions (last_used_at);
