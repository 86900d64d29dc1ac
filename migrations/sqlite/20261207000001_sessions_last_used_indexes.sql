-- Every rotation writes sessions.last_used_at, and each index holding it costs a
-- rotation one entry moved (a delete and an insert on pages of their own): measured
-- at +13 % to +20 % refreshes per second without the two below (docs/performance.md).
-- Their readers do without: the per-user list and the session cap sort one user's few
-- rows, and the cleanup finds idle sessions by a scan on a read connection (see
-- SqliteStore::delete_ended_sessions).
DROP INDEX sessions_user_id_idx;
CREATE INDEX sessions_user_id_idx ON sessions (user_id);
DROP INDEX sessions_last_used_at_idx;
