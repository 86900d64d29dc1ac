-- Constant storage per session: a rotation deletes the session's tokens rotated before
-- the previous one and outside the grace window, so a session keeps its current token,
-- the previous one and those rotated within the window, however often it refreshes.
-- A deleted token is still recognised as reuse: chain tokens carry the session id,
-- their generation and the chain's secret, of which the session keeps the SHA-256.
-- Sessions from before have no chain (their tokens keep the first format).
ALTER TABLE sessions
    ADD COLUMN generation bigint NOT NULL DEFAULT 0,
    ADD COLUMN chain_hash bytea;
