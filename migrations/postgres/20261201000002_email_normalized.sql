-- One email normalization, computed in Rust (`Email::normalized`: NFKC, Unicode
-- lower-case, NFC) and stored, so lookup, uniqueness and throttling agree; the database's
-- lower() follows its locale and disagreed with it for letters such as İ or a final Σ.
-- Rows are filled with lower(email) here, which is exact for ASCII addresses; the
-- server re-normalizes the others in Rust right after migrating (PgStore::prepare).
ALTER TABLE users ADD COLUMN email_normalized text;
UPDATE users SET email_normalized = lower(email);
ALTER TABLE users ALTER COLUMN email_normalized SET NOT NULL;
CREATE UNIQUE INDEX users_email_normalized_key ON users (email_normalized);
DROP INDEX users_email_lower_key;
