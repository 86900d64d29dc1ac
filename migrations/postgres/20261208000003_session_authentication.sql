-- Second factor (issue 17): how and when a session's user last authenticated, for the
-- access tokens' `amr` (RFC 8176) and `auth_time` claims, kept across refreshes. NULL
-- in sessions from before: read as ["pwd"] and the session's creation.
ALTER TABLE sessions ADD COLUMN auth_time timestamptz;
ALTER TABLE sessions ADD COLUMN amr text[];
