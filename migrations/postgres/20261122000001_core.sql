-- Users, sessions, refresh tokens (hashes only) and the audit trail.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    email         text NOT NULL CHECK (char_length(email) BETWEEN 3 AND 254),
    password_hash text NOT NULL,
    roles         text[] NOT NULL DEFAULT '{}',
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- Emails compare case-insensitively; the constraint name is mapped to 409 conflict.
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

-- A session is the chain of refresh tokens that one login started.
CREATE TABLE sessions (
    id               uuid PRIMARY KEY,
    user_id          uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    remember_me      boolean NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_used_at     timestamptz NOT NULL DEFAULT now(),
    -- absolute end of the session
    expires_at       timestamptz NOT NULL,
    revoked_at       timestamptz,
    revoked_reason   text,
    login_ip         text,
    login_user_agent text,
    last_ip          text,
    last_user_agent  text
);
CREATE INDEX sessions_user_id_idx ON sessions (user_id, last_used_at);

-- Refresh tokens are stored as SHA-256 of the token: a dump yields no usable token.
-- successor_sealed is the successor token encrypted under a key derived from THIS
-- token's plaintext, so the reuse grace window can hand the same successor to a
-- concurrent caller or a retry, while the database alone cannot decrypt it.
CREATE TABLE refresh_tokens (
    token_hash       bytea PRIMARY KEY,
    session_id       uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at       timestamptz NOT NULL DEFAULT now(),
    rotated_at       timestamptz,
    successor_hash   bytea,
    successor_sealed bytea
);
CREATE INDEX refresh_tokens_session_id_idx ON refresh_tokens (session_id);

-- Never holds a password, a token or a hash.
CREATE TABLE audit_events (
    id          bigserial PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL,
    user_id     uuid,
    session_id  uuid,
    ip          text,
    user_agent  text,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_user_id_idx ON audit_events (user_id, id DESC);
