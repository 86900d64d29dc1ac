//! `tessera copy`: moves an embedded (SQLite) deployment to PostgreSQL, so that it can
//! grow past one instance, with every user still logged in.
//!
//! Every table goes, in foreign-key order: users, sessions, refresh tokens (their
//! hashes, sealed successors and the sessions' chain-secret hashes, so every refresh
//! token keeps rotating), devices, audit events (ids kept, the sequence moved past
//! them), emailed tokens, the outbox (sealed payloads as they are: the new deployment
//! uses the same `keys.dir`, so its senders open them) and the saved revocation marks. The source is read in one read transaction
//! (one snapshot, in pages: [`super::sqlite::export`]) and the target written in one
//! transaction ([`super::postgres::import`]) into a database that holds no user yet: a
//! copy that fails leaves nothing behind and can simply be run again. A table added
//! later gets a row type here and a function on each side.
//!
//! The live revocation marks must also reach the revocation backend the new deployment
//! uses: [`copy_marks`] writes them to any [`Revocations`] (Redis, for several
//! instances), so that an access token revoked before the move stays revoked.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::postgres::{PgStore, import};
use super::sqlite::{SqliteStore, export};
use super::{Revocations, SavedMark, Store};
use crate::domain::{SessionId, UserId};

/// Rows per page.
const PAGE: i64 = 1000;

pub struct UserRow {
    pub id: Uuid,
    pub email: Option<String>,
    pub email_normalized: Option<String>,
    pub password_hash: String,
    pub roles: Vec<String>,
    pub disabled: bool,
    pub email_verified: bool,
    pub last_login_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub struct SessionRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub remember_me: bool,
    pub created_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_reason: Option<String>,
    pub login_ip: Option<String>,
    pub login_user_agent: Option<String>,
    pub last_ip: Option<String>,
    pub last_user_agent: Option<String>,
    pub generation: i64,
    pub chain_hash: Option<Vec<u8>>,
}

pub struct TokenRow {
    pub token_hash: Vec<u8>,
    pub session_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub rotated_at: Option<DateTime<Utc>>,
    pub successor_hash: Option<Vec<u8>>,
    pub successor_sealed: Option<Vec<u8>>,
}

pub struct DeviceRow {
    pub token_hash: Vec<u8>,
    pub user_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

pub struct EmailTokenRow {
    pub token_hash: Vec<u8>,
    pub user_id: Uuid,
    pub kind: String,
    pub new_email: Option<String>,
    pub new_email_normalized: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
}

/// An outbox row as it waits (its claim is not copied: the target's senders start
/// afresh).
pub struct OutboxCopyRow {
    pub id: i64,
    pub kind: String,
    pub user_id: Option<Uuid>,
    pub payload: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
}

/// An applied user migration (see `crate::auth::user_migrations`).
pub struct UserMigrationRow {
    pub version: i64,
    pub name: String,
    pub checksum: Vec<u8>,
    pub applied_at: DateTime<Utc>,
}

/// A user's TOTP (its secret as sealed: the new deployment keeps `keys.dir`).
pub struct TotpCopyRow {
    pub user_id: Uuid,
    pub secret_sealed: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub confirmed_at: Option<DateTime<Utc>>,
    pub last_step: i64,
}

pub struct RecoveryCodeRow {
    pub user_id: Uuid,
    pub code_hash: Vec<u8>,
    pub used_at: Option<DateTime<Utc>>,
}

/// What was copied, table by table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Copied {
    pub users: u64,
    pub sessions: u64,
    pub refresh_tokens: u64,
    pub devices: u64,
    pub audit_events: u64,
    pub email_tokens: u64,
    pub outbox: u64,
    pub revocation_marks: u64,
    pub user_migrations: u64,
    pub mfa_totp: u64,
    pub mfa_recovery_codes: u64,
}

/// Copies everything `from` holds into `to`, which must hold no user yet. `progress`
/// hears each table's name, the rows copied so far and its total.
pub async fn sqlite_to_postgres(
    from: &SqliteStore,
    to: &PgStore,
    mut progress: impl FnMut(&str, u64, u64),
) -> anyhow::Result<Copied> {
    let mut src = from.reader().begin().await?;
    let mut dst = to.pool().begin().await.context("cannot reach the target")?;
    anyhow::ensure!(
        import::is_empty(&mut dst).await?,
        "the target database already holds users; copy only into a new, empty database"
    );
    let mut copied = Copied::default();
    let mut report = |table: &str, done: &mut u64, n: usize, total: u64| {
        *done += n as u64;
        progress(table, *done, total);
    };

    let total = export::count(&mut src, "users").await?;
    let mut after = String::new();
    loop {
        let rows = export::users(&mut src, &after, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.id.to_string();
        import::users(&mut dst, &rows)
            .await
            .context("writing users")?;
        report("users", &mut copied.users, rows.len(), total);
    }

    let total = export::count(&mut src, "sessions").await?;
    let mut after = String::new();
    loop {
        let rows = export::sessions(&mut src, &after, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.id.to_string();
        import::sessions(&mut dst, &rows)
            .await
            .context("writing sessions")?;
        report("sessions", &mut copied.sessions, rows.len(), total);
    }

    let total = export::count(&mut src, "refresh_tokens").await?;
    let mut after = Vec::new();
    loop {
        let rows = export::refresh_tokens(&mut src, &after, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.token_hash.clone();
        import::refresh_tokens(&mut dst, &rows)
            .await
            .context("writing refresh tokens")?;
        report(
            "refresh_tokens",
            &mut copied.refresh_tokens,
            rows.len(),
            total,
        );
    }

    let total = export::count(&mut src, "devices").await?;
    let mut after = Vec::new();
    loop {
        let rows = export::devices(&mut src, &after, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.token_hash.clone();
        import::devices(&mut dst, &rows)
            .await
            .context("writing devices")?;
        report("devices", &mut copied.devices, rows.len(), total);
    }

    let total = export::count(&mut src, "audit_events").await?;
    let mut after = 0;
    loop {
        let rows = export::audit_events(&mut src, after, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        import::audit_events(&mut dst, &rows)
            .await
            .context("writing audit events")?;
        report("audit_events", &mut copied.audit_events, rows.len(), total);
    }

    let total = export::count(&mut src, "email_tokens").await?;
    let mut after = Vec::new();
    loop {
        let rows = export::email_tokens(&mut src, &after, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.token_hash.clone();
        import::email_tokens(&mut dst, &rows)
            .await
            .context("writing email tokens")?;
        report("email_tokens", &mut copied.email_tokens, rows.len(), total);
    }

    let total = export::count(&mut src, "outbox").await?;
    let mut after = 0;
    loop {
        let rows = export::outbox(&mut src, after, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        import::outbox(&mut dst, &rows)
            .await
            .context("writing the outbox")?;
        report("outbox", &mut copied.outbox, rows.len(), total);
    }

    let marks = export::revocation_marks(&mut src).await?;
    import::revocation_marks(&mut dst, &marks)
        .await
        .context("writing revocation marks")?;
    let total = marks.len() as u64;
    report(
        "revocation_marks",
        &mut copied.revocation_marks,
        marks.len(),
        total,
    );

    // Second factors, with their secrets as sealed (pending logins are not carried:
    // they live five minutes, and their users simply log in again).
    let totp = export::mfa_totp(&mut src).await?;
    import::mfa_totp(&mut dst, &totp)
        .await
        .context("writing second factors")?;
    let total = totp.len() as u64;
    report("mfa_totp", &mut copied.mfa_totp, totp.len(), total);
    let codes = export::mfa_recovery_codes(&mut src).await?;
    import::mfa_recovery_codes(&mut dst, &codes)
        .await
        .context("writing recovery codes")?;
    let total = codes.len() as u64;
    report(
        "mfa_recovery_codes",
        &mut copied.mfa_recovery_codes,
        codes.len(),
        total,
    );

    // So that `tessera migrate` on the new deployment applies only the files not
    // applied yet, and still sees an edited one.
    let applied = export::user_migrations(&mut src).await?;
    import::user_migrations(&mut dst, &applied)
        .await
        .context("writing the applied user migrations")?;
    let total = applied.len() as u64;
    report(
        "user_migrations",
        &mut copied.user_migrations,
        applied.len(),
        total,
    );

    dst.commit().await.context("committing the copy")?;
    src.commit().await.ok();
    Ok(copied)
}

/// Writes the live revocation marks of `from` (saved ones and those of sessions ended
/// less than `session_mark_secs` ago) to `to`, each for the rest of its life; returns
/// how many.
pub async fn copy_marks(
    from: &dyn Store,
    to: &dyn Revocations,
    session_mark_secs: i64,
) -> anyhow::Result<usize> {
    let now = Utc::now();
    let marks = from.live_marks(session_mark_secs).await?;
    for SavedMark {
        key,
        value,
        expires_at,
    } in &marks
    {
        let Ok(ttl) = (*expires_at - now).to_std() else {
            continue; // expired meanwhile
        };
        let ttl = ttl.max(Duration::from_millis(1));
        let (kind, target) = key
            .strip_prefix("revoked:")
            .and_then(|k| k.split_once(':'))
            .with_context(|| format!("unexpected revocation mark {key:?}"))?;
        let id = || Uuid::parse_str(target).with_context(|| format!("mark {key:?}"));
        match kind {
            "sid" => to.revoke_sessions(&[SessionId(id()?)], ttl).await?,
            "jti" => {
                to.revoke_token(target, ttl).await?;
            }
            "user" => to.revoke_user_tokens(UserId(id()?), *value, ttl).await?,
            _ => anyhow::bail!("unexpected revocation mark {key:?}"),
        }
    }
    Ok(marks.len())
}
