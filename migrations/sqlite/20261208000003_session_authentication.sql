-- See migrations/postgres/20261208000003_session_authentication.sql. `amr` is a JSON
-- array of strings.
ALTER TABLE sessions ADD COLUMN auth_time INTEGER;
ALTER TABLE sessions ADD COLUMN amr TEXT;
