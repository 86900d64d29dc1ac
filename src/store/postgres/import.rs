//! Writing pages of rows from another backend, for `tessera copy` (see
//! [`crate::store::copy`]): one statement per page (`UNNEST` of one array per column),
//! inside the caller's transaction. Columns that may hold NULL are bound `as _`: sqlx
//! types an array parameter as non-null elements.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::store::copy::{
    DeviceRow, EmailTokenRow, OutboxCopyRow, RecoveryCodeRow, SessionRow, TokenRow, TotpCopyRow,
    UserMigrationRow, UserRow,
};
use crate::store::{AuditRecord, SavedMark};

/// One column of a page.
fn col<R, T>(rows: &[R], f: impl Fn(&R) -> T) -> Vec<T> {
    rows.iter().map(f).collect()
}

/// True when the target holds no user yet.
pub async fn is_empty(conn: &mut PgConnection) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar!(r#"SELECT NOT EXISTS (SELECT 1 FROM users) AS "empty!""#)
            .fetch_one(conn)
            .await?,
    )
}

pub async fn users(conn: &mut PgConnection, rows: &[UserRow]) -> anyhow::Result<()> {
    // Roles travel as one JSON array per user (UNNEST cannot take an array of arrays).
    let last_login: Vec<Option<DateTime<Utc>>> = col(rows, |r| r.last_login_at);
    let roles = col(rows, |r| {
        serde_json::Value::from(r.roles.clone()).to_string()
    });
    sqlx::query!(
        r#"INSERT INTO users (id, email, email_normalized, password_hash, roles, disabled,
                              created_at, updated_at, email_verified, last_login_at)
           SELECT t.id, t.email, t.norm, t.hash,
                  ARRAY(SELECT jsonb_array_elements_text(t.roles::jsonb)),
                  t.disabled, t.created_at, t.updated_at, t.verified, t.last_login
           FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                       $6::bool[], $7::timestamptz[], $8::timestamptz[], $9::bool[],
                       $10::timestamptz[])
                AS t(id, email, norm, hash, roles, disabled, created_at, updated_at,
                     verified, last_login)"#,
        &col(rows, |r| r.id),
        // NULL for anonymous users: an array of options, which the macro's check of a
        // text[] parameter does not take as is.
        &col(rows, |r| r.email.clone()) as _,
        &col(rows, |r| r.email_normalized.clone()) as _,
        &col(rows, |r| r.password_hash.clone()),
        &roles,
        &col(rows, |r| r.disabled),
        &col(rows, |r| r.created_at),
        &col(rows, |r| r.updated_at),
        &col(rows, |r| r.email_verified),
        &last_login as _,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn sessions(conn: &mut PgConnection, rows: &[SessionRow]) -> anyhow::Result<()> {
    let revoked_at: Vec<Option<DateTime<Utc>>> = col(rows, |r| r.revoked_at);
    let text = |f: fn(&SessionRow) -> &Option<String>| col(rows, |r| f(r).clone());
    let chain_hash: Vec<Option<Vec<u8>>> = col(rows, |r| r.chain_hash.clone());
    sqlx::query!(
        r#"INSERT INTO sessions (id, user_id, remember_me, created_at, last_used_at,
                                 expires_at, revoked_at, revoked_reason, login_ip,
                                 login_user_agent, last_ip, last_user_agent, generation,
                                 chain_hash)
           SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bool[], $4::timestamptz[],
                                $5::timestamptz[], $6::timestamptz[], $7::timestamptz[],
                                $8::text[], $9::text[], $10::text[], $11::text[],
                                $12::text[], $13::int8[], $14::bytea[])"#,
        &col(rows, |r| r.id),
        &col(rows, |r| r.user_id),
        &col(rows, |r| r.remember_me),
        &col(rows, |r| r.created_at),
        &col(rows, |r| r.last_used_at),
        &col(rows, |r| r.expires_at),
        &revoked_at as _,
        &text(|r| &r.revoked_reason) as _,
        &text(|r| &r.login_ip) as _,
        &text(|r| &r.login_user_agent) as _,
        &text(|r| &r.last_ip) as _,
        &text(|r| &r.last_user_agent) as _,
        &col(rows, |r| r.generation),
        &chain_hash as _,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn refresh_tokens(conn: &mut PgConnection, rows: &[TokenRow]) -> anyhow::Result<()> {
    let rotated_at: Vec<Option<DateTime<Utc>>> = col(rows, |r| r.rotated_at);
    let successor_hash: Vec<Option<Vec<u8>>> = col(rows, |r| r.successor_hash.clone());
    let successor_sealed: Vec<Option<Vec<u8>>> = col(rows, |r| r.successor_sealed.clone());
    sqlx::query!(
        r#"INSERT INTO refresh_tokens (token_hash, session_id, created_at, rotated_at,
                                       successor_hash, successor_sealed)
           SELECT * FROM UNNEST($1::bytea[], $2::uuid[], $3::timestamptz[],
                                $4::timestamptz[], $5::bytea[], $6::bytea[])"#,
        &col(rows, |r| r.token_hash.clone()),
        &col(rows, |r| r.session_id),
        &col(rows, |r| r.created_at),
        &rotated_at as _,
        &successor_hash as _,
        &successor_sealed as _,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn devices(conn: &mut PgConnection, rows: &[DeviceRow]) -> anyhow::Result<()> {
    sqlx::query!(
        r#"INSERT INTO devices (token_hash, user_id, created_at, last_used_at, expires_at)
           SELECT * FROM UNNEST($1::bytea[], $2::uuid[], $3::timestamptz[],
                                $4::timestamptz[], $5::timestamptz[])"#,
        &col(rows, |r| r.token_hash.clone()),
        &col(rows, |r| r.user_id),
        &col(rows, |r| r.created_at),
        &col(rows, |r| r.last_used_at),
        &col(rows, |r| r.expires_at),
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn audit_events(conn: &mut PgConnection, rows: &[AuditRecord]) -> anyhow::Result<()> {
    let ids = |f: fn(&AuditRecord) -> Option<Uuid>| -> Vec<Option<Uuid>> { col(rows, f) };
    let text = |f: fn(&AuditRecord) -> &Option<String>| col(rows, |r| f(r).clone());
    sqlx::query!(
        r#"INSERT INTO audit_events (id, occurred_at, kind, user_id, session_id, actor_id,
                                     ip, user_agent, detail, request_id)
           SELECT t.id, t.occurred_at, t.kind, t.user_id, t.session_id, t.actor_id, t.ip,
                  t.user_agent, t.detail::jsonb, t.request_id
           FROM UNNEST($1::int8[], $2::timestamptz[], $3::text[], $4::uuid[],
                       $5::uuid[], $6::uuid[], $7::text[], $8::text[], $9::text[],
                       $10::text[])
                AS t(id, occurred_at, kind, user_id, session_id, actor_id, ip,
                     user_agent, detail, request_id)"#,
        &col(rows, |r| r.id),
        &col(rows, |r| r.occurred_at),
        &col(rows, |r| r.kind.clone()),
        &ids(|r| r.user_id) as _,
        &ids(|r| r.session_id) as _,
        &ids(|r| r.actor_id) as _,
        &text(|r| &r.ip) as _,
        &text(|r| &r.user_agent) as _,
        &col(rows, |r| r.detail.to_string()),
        &text(|r| &r.request_id) as _,
    )
    .execute(&mut *conn)
    .await?;
    // Events written later continue after the copied ones.
    sqlx::query!(
        r#"SELECT setval('audit_events_id_seq', greatest((SELECT max(id) FROM audit_events), 1))
           AS "next!""#
    )
    .fetch_one(conn)
    .await?;
    Ok(())
}

pub async fn email_tokens(conn: &mut PgConnection, rows: &[EmailTokenRow]) -> anyhow::Result<()> {
    let text = |f: fn(&EmailTokenRow) -> &Option<String>| col(rows, |r| f(r).clone());
    let used_at: Vec<Option<DateTime<Utc>>> = col(rows, |r| r.used_at);
    sqlx::query!(
        r#"INSERT INTO email_tokens (token_hash, user_id, kind, new_email,
                                     new_email_normalized, created_at, expires_at, used_at)
           SELECT * FROM UNNEST($1::bytea[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                                $6::timestamptz[], $7::timestamptz[], $8::timestamptz[])"#,
        &col(rows, |r| r.token_hash.clone()),
        &col(rows, |r| r.user_id),
        &col(rows, |r| r.kind.clone()),
        &text(|r| &r.new_email) as _,
        &text(|r| &r.new_email_normalized) as _,
        &col(rows, |r| r.created_at),
        &col(rows, |r| r.expires_at),
        &used_at as _,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn outbox(conn: &mut PgConnection, rows: &[OutboxCopyRow]) -> anyhow::Result<()> {
    let user_ids: Vec<Option<Uuid>> = col(rows, |r| r.user_id);
    sqlx::query!(
        r#"INSERT INTO outbox (id, kind, payload, created_at, attempts, next_attempt_at,
                               user_id)
           SELECT * FROM UNNEST($1::int8[], $2::text[], $3::bytea[], $4::timestamptz[],
                                $5::int4[], $6::timestamptz[], $7::uuid[])"#,
        &col(rows, |r| r.id),
        &col(rows, |r| r.kind.clone()),
        &col(rows, |r| r.payload.clone()),
        &col(rows, |r| r.created_at),
        &col(rows, |r| r.attempts),
        &col(rows, |r| r.next_attempt_at),
        &user_ids as _,
    )
    .execute(&mut *conn)
    .await?;
    // Rows written later continue after the copied ones.
    sqlx::query!(
        r#"SELECT setval('outbox_id_seq', greatest((SELECT max(id) FROM outbox), 1))
           AS "next!""#
    )
    .fetch_one(conn)
    .await?;
    Ok(())
}

pub async fn mfa_totp(conn: &mut PgConnection, rows: &[TotpCopyRow]) -> anyhow::Result<()> {
    let confirmed: Vec<Option<DateTime<Utc>>> = col(rows, |r| r.confirmed_at);
    sqlx::query!(
        r#"INSERT INTO mfa_totp (user_id, secret_sealed, created_at, confirmed_at, last_step)
           SELECT * FROM UNNEST($1::uuid[], $2::bytea[], $3::timestamptz[], $4::timestamptz[],
                                $5::int8[])"#,
        &col(rows, |r| r.user_id),
        &col(rows, |r| r.secret_sealed.clone()),
        &col(rows, |r| r.created_at),
        &confirmed as _,
        &col(rows, |r| r.last_step),
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn mfa_recovery_codes(
    conn: &mut PgConnection,
    rows: &[RecoveryCodeRow],
) -> anyhow::Result<()> {
    let used: Vec<Option<DateTime<Utc>>> = col(rows, |r| r.used_at);
    sqlx::query!(
        r#"INSERT INTO mfa_recovery_codes (user_id, code_hash, used_at)
           SELECT * FROM UNNEST($1::uuid[], $2::bytea[], $3::timestamptz[])"#,
        &col(rows, |r| r.user_id),
        &col(rows, |r| r.code_hash.clone()),
        &used as _,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn user_migrations(
    conn: &mut PgConnection,
    rows: &[UserMigrationRow],
) -> anyhow::Result<()> {
    sqlx::query!(
        r#"INSERT INTO user_migrations (version, name, checksum, applied_at)
           SELECT * FROM UNNEST($1::int8[], $2::text[], $3::bytea[], $4::timestamptz[])"#,
        &col(rows, |r| r.version),
        &col(rows, |r| r.name.clone()),
        &col(rows, |r| r.checksum.clone()),
        &col(rows, |r| r.applied_at),
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn revocation_marks(conn: &mut PgConnection, rows: &[SavedMark]) -> anyhow::Result<()> {
    sqlx::query!(
        r#"INSERT INTO revocation_marks (key, value, expires_at)
           SELECT * FROM UNNEST($1::text[], $2::int8[], $3::timestamptz[])"#,
        &col(rows, |r| r.key.clone()),
        &col(rows, |r| r.value),
        &col(rows, |r| r.expires_at),
    )
    .execute(conn)
    .await?;
    Ok(())
}
