-- Accounts and email (issue 16): whether a user's address is confirmed, the single-use
-- tokens that emails carry, and the outbox that delivers them.

ALTER TABLE users ADD COLUMN email_verified boolean NOT NULL DEFAULT false;
-- When the user last started a session with their password (user administration).
ALTER TABLE users ADD COLUMN last_login_at timestamptz;

-- SHA-256 of each emailed token (never the token). `kind` is verify_email,
-- reset_password or confirm_email_change; `new_email` the address an email change
-- goes to. A token is used once (`used_at`); a newer token of the same kind for the
-- same user deletes the older ones, which then read as unknown.
CREATE TABLE email_tokens (
    token_hash                bytea PRIMARY KEY,
    user_id                   uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind                      text NOT NULL,
    new_email                 text,
    new_email_normalized      text,
    created_at                timestamptz NOT NULL DEFAULT now(),
    expires_at                timestamptz NOT NULL,
    used_at                   timestamptz
);
CREATE INDEX email_tokens_user_id_idx ON email_tokens (user_id, kind);
CREATE INDEX email_tokens_expires_at_idx ON email_tokens (expires_at);

-- What is to be delivered: written in the transaction of the change it reports, then
-- claimed by one instance's sender (SKIP LOCKED), delivered at least once, and deleted.
-- `payload` is sealed (AES-256-GCM under keys.dir/outbox.secret): it holds the link's
-- token and the address, which a database dump must not yield. `kind` says which
-- deliverer takes it ("email"; webhooks later). `claimed_until` is a lease: a sender
-- that dies leaves its rows to another after it. `user_id` names the user a row is
-- about (no foreign key: a row may outlive nothing, but deleting a user deletes its
-- rows with it, by this column).
CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    kind            text NOT NULL,
    user_id         uuid,
    payload         bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_until   timestamptz
);
CREATE INDEX outbox_next_attempt_at_idx ON outbox (next_attempt_at);
CREATE INDEX outbox_user_id_idx ON outbox (user_id) WHERE user_id IS NOT NULL;
