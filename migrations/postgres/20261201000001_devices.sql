-- Known devices: a device token per device that logged in (only SHA-256 of it is
-- stored), so that its later logins are counted in its own failure budget rather than
-- in the per-account one that strangers can exhaust. Deleted with the user.
CREATE TABLE devices (
    token_hash   bytea PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX devices_user_id_idx ON devices (user_id);
CREATE INDEX devices_expires_at_idx ON devices (expires_at);
