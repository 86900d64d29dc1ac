//! Reading every table in pages, for `tessera copy` (see [`crate::store::copy`]): each
//! page the rows after a cursor in key order, read inside the caller's transaction so
//! that all pages come from one snapshot.

use sqlx::SqliteConnection;

use super::{opt_uuid, roles_from, time, uuid};
use crate::store::copy::{
    DeviceRow, EmailTokenRow, OutboxCopyRow, RecoveryCodeRow, SessionRow, TokenRow, TotpCopyRow,
    UserMigrationRow, UserRow,
};
use crate::store::{AuditRecord, SavedMark, StoreError};

pub async fn users(
    conn: &mut SqliteConnection,
    after: &str,
    limit: i64,
) -> anyhow::Result<Vec<UserRow>> {
    let rows = sqlx::query!(
        r#"SELECT id, email, email_normalized, password_hash, roles, disabled, email_verified,
                  last_login_at, created_at, updated_at
           FROM users WHERE id > ?1 ORDER BY id LIMIT ?2"#,
        after,
        limit,
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(UserRow {
                id: uuid(&r.id)?,
                email: r.email,
                email_normalized: r.email_normalized,
                password_hash: r.password_hash,
                roles: roles_from(&r.roles)?,
                disabled: r.disabled,
                email_verified: r.email_verified,
                last_login_at: r.last_login_at.map(time),
                created_at: time(r.created_at),
                updated_at: time(r.updated_at),
            })
        })
        .collect()
}

pub async fn sessions(
    conn: &mut SqliteConnection,
    after: &str,
    limit: i64,
) -> anyhow::Result<Vec<SessionRow>> {
    let rows = sqlx::query!(
        r#"SELECT id, user_id, remember_me, created_at, last_used_at, expires_at, revoked_at,
                  revoked_reason, login_ip, login_user_agent, last_ip, last_user_agent,
                  generation, chain_hash
           FROM sessions WHERE id > ?1 ORDER BY id LIMIT ?2"#,
        after,
        limit,
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(SessionRow {
                id: uuid(&r.id)?,
                user_id: uuid(&r.user_id)?,
                remember_me: r.remember_me,
                created_at: time(r.created_at),
                last_used_at: time(r.last_used_at),
                expires_at: time(r.expires_at),
                revoked_at: r.revoked_at.map(time),
                revoked_reason: r.revoked_reason,
                login_ip: r.login_ip,
                login_user_agent: r.login_user_agent,
                last_ip: r.last_ip,
                last_user_agent: r.last_user_agent,
                generation: r.generation,
                chain_hash: r.chain_hash,
            })
        })
        .collect()
}

pub async fn refresh_tokens(
    conn: &mut SqliteConnection,
    after: &[u8],
    limit: i64,
) -> anyhow::Result<Vec<TokenRow>> {
    let rows = sqlx::query!(
        r#"SELECT token_hash, session_id, created_at, rotated_at, successor_hash,
                  successor_sealed
           FROM refresh_tokens WHERE token_hash > ?1 ORDER BY token_hash LIMIT ?2"#,
        after,
        limit,
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(TokenRow {
                token_hash: r.token_hash,
                session_id: uuid(&r.session_id)?,
                created_at: time(r.created_at),
                rotated_at: r.rotated_at.map(time),
                successor_hash: r.successor_hash,
                successor_sealed: r.successor_sealed,
            })
        })
        .collect()
}

pub async fn devices(
    conn: &mut SqliteConnection,
    after: &[u8],
    limit: i64,
) -> anyhow::Result<Vec<DeviceRow>> {
    let rows = sqlx::query!(
        r#"SELECT token_hash, user_id, created_at, last_used_at, expires_at
           FROM devices WHERE token_hash > ?1 ORDER BY token_hash LIMIT ?2"#,
        after,
        limit,
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(DeviceRow {
                token_hash: r.token_hash,
                user_id: uuid(&r.user_id)?,
                created_at: time(r.created_at),
                last_used_at: time(r.last_used_at),
                expires_at: time(r.expires_at),
            })
        })
        .collect()
}

pub async fn audit_events(
    conn: &mut SqliteConnection,
    after: i64,
    limit: i64,
) -> anyhow::Result<Vec<AuditRecord>> {
    let rows = sqlx::query!(
        r#"SELECT id AS "id!", occurred_at, kind, user_id, session_id, actor_id, ip,
                  user_agent, detail, request_id
           FROM audit_events WHERE id > ?1 ORDER BY id LIMIT ?2"#,
        after,
        limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| audit_record!(r))
        .collect::<Result<_, _>>()?)
}

pub async fn email_tokens(
    conn: &mut SqliteConnection,
    after: &[u8],
    limit: i64,
) -> anyhow::Result<Vec<EmailTokenRow>> {
    let rows = sqlx::query!(
        r#"SELECT token_hash, user_id, kind, new_email, new_email_normalized, created_at,
                  expires_at, used_at
           FROM email_tokens WHERE token_hash > ?1 ORDER BY token_hash LIMIT ?2"#,
        after,
        limit,
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(EmailTokenRow {
                token_hash: r.token_hash,
                user_id: uuid(&r.user_id)?,
                kind: r.kind,
                new_email: r.new_email,
                new_email_normalized: r.new_email_normalized,
                created_at: time(r.created_at),
                expires_at: time(r.expires_at),
                used_at: r.used_at.map(time),
            })
        })
        .collect()
}

pub async fn outbox(
    conn: &mut SqliteConnection,
    after: i64,
    limit: i64,
) -> anyhow::Result<Vec<OutboxCopyRow>> {
    let rows = sqlx::query!(
        r#"SELECT id AS "id!", kind, user_id, payload, created_at,
                  attempts AS "attempts!: i32", next_attempt_at
           FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2"#,
        after,
        limit,
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(OutboxCopyRow {
                id: r.id,
                kind: r.kind,
                user_id: opt_uuid(r.user_id)?,
                payload: r.payload,
                created_at: time(r.created_at),
                attempts: r.attempts,
                next_attempt_at: time(r.next_attempt_at),
            })
        })
        .collect()
}

/// Every user's TOTP.
pub async fn mfa_totp(conn: &mut SqliteConnection) -> anyhow::Result<Vec<TotpCopyRow>> {
    let rows = sqlx::query!(
        r#"SELECT user_id, secret_sealed, created_at, confirmed_at, last_step
           FROM mfa_totp ORDER BY user_id"#
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(TotpCopyRow {
                user_id: uuid(&r.user_id)?,
                secret_sealed: r.secret_sealed,
                created_at: time(r.created_at),
                confirmed_at: r.confirmed_at.map(time),
                last_step: r.last_step,
            })
        })
        .collect()
}

/// Every recovery code (hashed), used or not.
pub async fn mfa_recovery_codes(
    conn: &mut SqliteConnection,
) -> anyhow::Result<Vec<RecoveryCodeRow>> {
    let rows = sqlx::query!(
        "SELECT user_id, code_hash, used_at FROM mfa_recovery_codes ORDER BY user_id, code_hash"
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(RecoveryCodeRow {
                user_id: uuid(&r.user_id)?,
                code_hash: r.code_hash,
                used_at: r.used_at.map(time),
            })
        })
        .collect()
}

/// Every applied user migration.
pub async fn user_migrations(conn: &mut SqliteConnection) -> anyhow::Result<Vec<UserMigrationRow>> {
    let rows = sqlx::query!(
        "SELECT version, name, checksum, applied_at FROM user_migrations ORDER BY version"
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| UserMigrationRow {
            version: r.version,
            name: r.name,
            checksum: r.checksum,
            applied_at: time(r.applied_at),
        })
        .collect())
}

/// Every saved revocation mark, live or not (the target's cleanup deletes the expired).
pub async fn revocation_marks(conn: &mut SqliteConnection) -> anyhow::Result<Vec<SavedMark>> {
    let rows = sqlx::query!("SELECT key, value, expires_at FROM revocation_marks ORDER BY key")
        .fetch_all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| SavedMark {
            key: r.key,
            value: r.value,
            expires_at: time(r.expires_at),
        })
        .collect())
}

/// Rows in `table`, for progress.
pub async fn count(conn: &mut SqliteConnection, table: &'static str) -> anyhow::Result<u64> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"));
    let n: i64 = sqlx::query_scalar(sql).fetch_one(conn).await?;
    Ok(n as u64)
}
