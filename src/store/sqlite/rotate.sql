UPDATE refresh_tokens
SET rotated_at = ?, successor_hash = ?, successor_sealed = ?
WHERE token_hash = ? AND rotated_at IS NULL
  AND EXISTS (SELECT 1 FROM sessions s JOIN users u ON u.id = s.user_id
              WHERE s.id = refresh_tokens.session_id
                AND s.revoked_at IS NULL AND s.expires_at > ?
                AND s.last_used_at > ? AND NOT u.disabled);
UPDATE sessions SET last_used_at = ?, last_ip = ?, last_user_agent = ?,
                    generation = generation + 1
WHERE id = (SELECT session_id FROM refresh_tokens
            WHERE token_hash = ? AND successor_hash = ?);
INSERT INTO refresh_tokens (token_hash, session_id, created_at)
SELECT ?, session_id, ? FROM refresh_tokens
WHERE token_hash = ? AND successor_hash = ?;
DELETE FROM refresh_tokens
WHERE session_id = (SELECT session_id FROM refresh_tokens
                    WHERE token_hash = ? AND successor_hash = ?)
  AND token_hash <> ? AND rotated_at < ?;
INSERT INTO audit_events (occurred_at, kind, user_id, session_id, ip, user_agent)
SELECT ?, ?, s.user_id, s.id, ?, ?
FROM refresh_tokens rt JOIN sessions s ON s.id = rt.session_id
WHERE ? AND rt.token_hash = ? AND rt.successor_hash = ?;
SELECT CAST(? AS INTEGER) AS "slot!: i64", rt.session_id, s.user_id, s.expires_at,
       s.remember_me, u.roles
FROM refresh_tokens rt
JOIN sessions s ON s.id = rt.session_id
JOIN users u ON u.id = s.user_id
WHERE rt.token_hash = ? AND rt.successor_hash = ?
