-- Second factor (issue 17): a user's TOTP secret, sealed (AES-256-GCM under
-- keys.dir/mfa.secret, the user id as associated data: a database dump alone does not
-- yield it), `confirmed_at` NULL while enrolling, and the last time step a code was
-- accepted for (a code is accepted once: only later steps pass).
CREATE TABLE mfa_totp (
    user_id       uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    secret_sealed bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    confirmed_at  timestamptz,
    last_step     bigint NOT NULL DEFAULT 0
);

-- Ten single-use recovery codes per user, by SHA-256 (they are 80 random bits).
CREATE TABLE mfa_recovery_codes (
    user_id   uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash bytea NOT NULL,
    used_at   timestamptz,
    PRIMARY KEY (user_id, code_hash)
);

-- A login waiting for its second factor: the SHA-256 of its `mfa_token`, what the
-- session will be once a code passes (the device token to hand back sealed, as the
-- TOTP secret is), and the wrong codes so far (5 end it).
CREATE TABLE mfa_challenges (
    token_hash    bytea PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    password_hash text NOT NULL,
    remember_me   boolean NOT NULL,
    cookie        boolean NOT NULL,
    device_sealed bytea NOT NULL,
    failures      integer NOT NULL DEFAULT 0,
    expires_at    timestamptz NOT NULL
);
CREATE INDEX mfa_challenges_expires_at_idx ON mfa_challenges (expires_at);
