-- Each rotation deletes its session's tokens rotated before the grace window. With the
-- index on session_id alone that DELETE fetched every kept token of the session from
-- the heap to test rotated_at: a session refreshed often (a client looping, a
-- benchmark) keeps every token of the last grace window, so each rotation read
-- hundreds of rows, more as the window filled (docs/performance.md, "the pruning
-- scan"). With rotated_at in the index the DELETE reads only the rows it removes.
-- The table holds a few rows per session (the rotation prunes it), so building the
-- index takes the table's write lock only briefly.
DROP INDEX refresh_tokens_session_id_idx;
CREATE INDEX refresh_tokens_session_id_idx ON refresh_tokens (session_id, rotated_at);
