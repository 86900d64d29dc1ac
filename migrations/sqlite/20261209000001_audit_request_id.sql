-- The request that wrote an audit row (its X-Request-Id, taken from a trusted proxy or
-- generated), so one id links the proxy's log, Tessera's log and the audit trail.
ALTER TABLE audit_events ADD COLUMN request_id TEXT;
