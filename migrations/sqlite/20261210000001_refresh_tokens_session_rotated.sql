-- Each rotation deletes its session's tokens rotated before the grace window. With the
-- index on session_id alone that DELETE read every kept token of the session from the
-- table to test rotated_at: a session refreshed often (a client looping, a benchmark)
-- keeps every token of the last grace window, so each rotation did hundreds of seeks
-- and slowed as the window filled (docs/performance.md, 2026-12-07 "the pruning scan").
-- With rotated_at in the index the DELETE reads only the rows it removes. The current
-- token (rotated_at NULL) sorts first; setting rotated_at moves its entry within the
-- session's own run of entries, on the page the rotation writes anyway.
DROP INDEX refresh_tokens_session_id_idx;
CREATE INDEX refresh_tokens_session_id_idx ON refresh_tokens (session_id, rotated_at);
