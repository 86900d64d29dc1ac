//! The PostgreSQL [`Store`]. Every query is compile-time checked (`.sqlx/` holds the
//! offline data) and every request path is one statement on one pooled connection, so
//! a request never holds a connection while waiting for a second one.

pub mod import;

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgPool};
use uuid::Uuid;

use super::{
    AuditCursor, AuditEvent, AuditKind, AuditQuery, AuditRecord, ClientInfo, CreatedSession,
    Credentials, EmailTokenGrant, Grant, MfaChallenge, MigrationEffects, NewSession, NoticeFor,
    OpFailure, OutboxRow, PasswordReset, Reauthentication, RefreshState, Rotation, SavedMark,
    SessionInfo, Store, StoreError, StoreResult, TokenRefusal, TotpRow, User, UserChange,
    UserMigrationRecord, UserOp, UserUpdate, refusal, session_ids,
};
use crate::config::{DatabaseSettings, PgTls, read_ca_file};
use crate::domain::{ANONYMOUS_ROLE, Email, SessionId, UserId};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The connection holding the single-instance advisory lock, once claimed.
    claim: std::sync::Arc<tokio::sync::Mutex<Option<sqlx::PgConnection>>>,
}

impl PgStore {
    /// A lazy pool: the server starts even while Postgres is down and connects when it
    /// is back; requests in between get 503.
    pub fn connect_lazy(settings: &DatabaseSettings) -> anyhow::Result<Self> {
        let mut options = connect_options(settings)?;
        warn_if_unverified(&options);
        if settings.statement_timeout_ms > 0 {
            // Request paths only: a stalled statement answers 503 (class 57, see
            // `classify`) instead of outliving its client.
            let timeout = settings.statement_timeout_ms.to_string();
            options = options.options([("statement_timeout", timeout.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
            .connect_lazy_with(options);
        Ok(PgStore {
            pool,
            claim: Default::default(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the database if it is missing (needs CREATEDB), then migrates.
    pub async fn prepare(settings: &DatabaseSettings, migrate: bool) -> anyhow::Result<()> {
        let options = connect_options(settings)?;
        if settings.create_database {
            create_database_if_missing(&options).await?;
        }
        if migrate {
            let mut conn = options
                .connect()
                .await
                .map_err(|e| explain_connect(e, "to run migrations"))?;
            MIGRATOR
                .run(&mut conn)
                .await
                .context("running migrations failed")?;
            renormalize_emails(&mut conn).await?;
            conn.close().await.ok();
        }
        Ok(())
    }
}

fn connect_options(settings: &DatabaseSettings) -> anyhow::Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(settings.url.expose_secret())
        .context("database.url is not a valid PostgreSQL URL")?
        .log_statements(log::LevelFilter::Debug);
    with_tls(options, settings)
}

/// Applies `database.sslmode` and `database.ca_file` over what the URL says.
fn with_tls(
    mut options: PgConnectOptions,
    settings: &DatabaseSettings,
) -> anyhow::Result<PgConnectOptions> {
    if let Some(mode) = settings.sslmode {
        options = options.ssl_mode(match mode {
            PgTls::Disable => PgSslMode::Disable,
            PgTls::Prefer => PgSslMode::Prefer,
            PgTls::Require => PgSslMode::Require,
            PgTls::VerifyCa => PgSslMode::VerifyCa,
            PgTls::VerifyFull => PgSslMode::VerifyFull,
        });
    }
    let Some(pem) = read_ca_file(&settings.ca_file, "database.ca_file")? else {
        return Ok(options);
    };
    options = options.ssl_root_cert_from_pem(pem);
    match options.get_ssl_mode() {
        // As libpq: a root certificate makes "require" verify the chain.
        PgSslMode::Require => Ok(options.ssl_mode(PgSslMode::VerifyCa)),
        PgSslMode::VerifyCa | PgSslMode::VerifyFull => Ok(options),
        other => anyhow::bail!(
            "database.ca_file is set but sslmode is {other:?}, which never checks the \
             server's certificate: set database.sslmode to \"verify-full\""
        ),
    }
}

/// Warns when the server is reached over the network without its certificate being
/// checked: anyone on the path could read or change what Tessera stores.
fn warn_if_unverified(options: &PgConnectOptions) {
    let host = options.get_host();
    let local = options.get_socket().is_some()
        || host.starts_with('/')
        || host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !local && !matches!(options.get_ssl_mode(), PgSslMode::VerifyFull) {
        tracing::warn!(
            host,
            sslmode = ?options.get_ssl_mode(),
            "PostgreSQL is reached over the network without checking its certificate \
             for its name; set database.sslmode = \"verify-full\" (and database.ca_file to \
             the CA that signed it, unless a public one did)"
        );
    }
}

/// An error from connecting, with what the operator should check when TLS failed.
fn explain_connect(err: sqlx::Error, doing: &str) -> anyhow::Error {
    // A refused certificate comes as an I/O error from the TLS stream.
    let tls = matches!(err, sqlx::Error::Tls(_)) || err.to_string().contains("peer certificate");
    let hint = match tls {
        true => {
            "TLS with PostgreSQL failed: check database.sslmode and database.ca_file (the \
             CA certificate that signed the server's certificate; for verify-full the \
             certificate must also name the host in database.url)"
        }
        false => "is it running and is database.url (TESSERA__DATABASE__URL) right?",
    };
    anyhow::Error::new(err).context(format!("cannot connect to PostgreSQL {doing}; {hint}"))
}

/// Gives rows whose email is not plain ASCII the normalization computed in Rust (the
/// migration that added `email_normalized` could only use SQL's `lower()`). Idempotent
/// and cheap once done: only rows whose stored form differs are written. Two rows that
/// now normalize alike are left as they are, with a warning for the operator.
async fn renormalize_emails(conn: &mut sqlx::PgConnection) -> anyhow::Result<()> {
    let rows =
        sqlx::query!(r#"SELECT id, email, email_normalized FROM users WHERE email !~ '^[-]*$'"#)
            .fetch_all(&mut *conn)
            .await
            .context("reading emails to normalize")?;
    for row in rows {
        let Some(Ok(email)) = row.email.as_deref().map(Email::parse) else {
            continue;
        };
        let normalized = email.normalized();
        if row.email_normalized.as_deref() == Some(normalized.as_str()) {
            continue;
        }
        let done = sqlx::query!(
            "UPDATE users SET email_normalized = $2 WHERE id = $1",
            row.id,
            normalized
        )
        .execute(&mut *conn)
        .await;
        match done {
            Ok(_) => tracing::info!(user_id = %row.id, "email normalization updated"),
            Err(e) => tracing::warn!(
                user_id = %row.id,
                error = %e,
                "two users' emails now normalize alike; left as it was, resolve by hand"
            ),
        }
    }
    Ok(())
}

async fn create_database_if_missing(options: &PgConnectOptions) -> anyhow::Result<()> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut conn = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .map_err(|e| explain_connect(e, "to create the database"))?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match // The name is quoted as an identifier above.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}"))).execute(&mut conn).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another instance created it between our check and our CREATE.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create database {name}"));
            }
        }
    }
    conn.close().await.ok();
    Ok(())
}

/// Sorts sqlx errors into "retry later" (503) and everything else.
fn classify(err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.constraint() == Some("users_email_normalized_key") => {
            StoreError::Conflict
        }
        sqlx::Error::Database(db) => {
            // Class 08: connection exception; 57: operator intervention (shutdown);
            // 53: insufficient resources.
            let code = db.code().unwrap_or_default();
            if code.starts_with("08") || code.starts_with("57") || code.starts_with("53") {
                StoreError::Unavailable(err.into())
            } else {
                StoreError::Other(err.into())
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err.into()),
        _ => StoreError::Other(err.into()),
    }
}

fn user_from(
    id: Uuid,
    email: Option<String>,
    roles: Vec<String>,
    disabled: bool,
    email_verified: bool,
    created_at: chrono::DateTime<chrono::Utc>,
    last_login_at: Option<chrono::DateTime<chrono::Utc>>,
) -> User {
    User {
        id: UserId(id),
        email,
        roles,
        disabled,
        email_verified,
        created_at,
        last_login_at,
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn pool_status(&self) -> super::PoolStatus {
        super::PoolStatus::of(&self.pool)
    }

    async fn probe_acquire(&self) -> StoreResult<Duration> {
        super::probe_acquire(&self.pool).await.map_err(classify)
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn clock(&self) -> StoreResult<chrono::DateTime<chrono::Utc>> {
        sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
            .fetch_one(&self.pool)
            .await
            .map_err(classify)
    }

    async fn create_user(
        &self,
        email: &Email,
        password_hash: &str,
        roles: &[String],
        verification: Option<EmailTokenGrant<'_>>,
    ) -> StoreResult<User> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let row = sqlx::query!(
            r#"INSERT INTO users (id, email, email_normalized, password_hash, roles)
               VALUES ($1, $2, $3, $4, $5)
               RETURNING id, email, roles, disabled, email_verified, created_at, last_login_at"#,
            Uuid::new_v4(),
            email.as_str(),
            email.normalized(),
            password_hash,
            roles,
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        if let Some(grant) = verification {
            insert_email_token(&mut tx, row.id, &grant).await?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(user_from(
            row.id,
            row.email,
            row.roles,
            row.disabled,
            row.email_verified,
            row.created_at,
            row.last_login_at,
        ))
    }

    async fn create_anonymous(&self, password_hash: &str) -> StoreResult<User> {
        let row = sqlx::query!(
            r#"INSERT INTO users (id, password_hash, roles) VALUES ($1, $2, $3)
               RETURNING id, email, roles, disabled, email_verified, created_at, last_login_at"#,
            Uuid::new_v4(),
            password_hash,
            &[ANONYMOUS_ROLE.to_owned()] as &[String],
        )
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        Ok(user_from(
            row.id,
            row.email,
            row.roles,
            row.disabled,
            row.email_verified,
            row.created_at,
            row.last_login_at,
        ))
    }

    async fn convert_anonymous(
        &self,
        user: UserId,
        email: &Email,
        password_hash: &str,
        roles: &[String],
        verification: Option<EmailTokenGrant<'_>>,
    ) -> StoreResult<Option<User>> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let row = sqlx::query!(
            r#"UPDATE users SET email = $2, email_normalized = $3, password_hash = $4, roles = $5,
                                updated_at = now()
               WHERE id = $1 AND email IS NULL AND NOT disabled
               RETURNING id, email, roles, disabled, email_verified, created_at, last_login_at"#,
            user.0,
            email.as_str(),
            email.normalized(),
            password_hash,
            roles,
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        let Some(row) = row else {
            return Ok(None);
        };
        if let Some(grant) = verification {
            insert_email_token(&mut tx, row.id, &grant).await?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(Some(user_from(
            row.id,
            row.email,
            row.roles,
            row.disabled,
            row.email_verified,
            row.created_at,
            row.last_login_at,
        )))
    }

    async fn idle_anonymous_users(
        &self,
        retention_secs: i64,
        batch: i64,
    ) -> StoreResult<Vec<UserId>> {
        let ids = sqlx::query_scalar!(
            r#"SELECT id FROM users u
               WHERE email IS NULL
                 AND created_at < now() - make_interval(secs => $1::float8)
                 AND NOT EXISTS (
                     SELECT 1 FROM sessions s
                     WHERE s.user_id = u.id
                       AND s.last_used_at > now() - make_interval(secs => $1::float8))
               ORDER BY created_at
               LIMIT $2"#,
            retention_secs as f64,
            batch,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(ids.into_iter().map(UserId).collect())
    }

    async fn find_credentials(
        &self,
        email: &Email,
        device: Option<&[u8]>,
    ) -> StoreResult<Option<Credentials>> {
        let row = sqlx::query!(
            r#"SELECT u.id, u.email, u.roles, u.disabled, u.email_verified, u.created_at, u.last_login_at,
                      u.password_hash,
                      EXISTS (SELECT 1 FROM devices d
                              WHERE d.token_hash = $2 AND d.user_id = u.id
                                AND d.expires_at > now()) AS "device_known!"
               FROM users u WHERE u.email_normalized = $1"#,
            email.normalized(),
            device,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.map(|r| Credentials {
            user: user_from(
                r.id,
                r.email,
                r.roles,
                r.disabled,
                r.email_verified,
                r.created_at,
                r.last_login_at,
            ),
            password_hash: r.password_hash,
            device_known: r.device_known,
        }))
    }

    async fn find_user(&self, id: UserId) -> StoreResult<Option<User>> {
        let row = sqlx::query!(
            r#"SELECT id, email, roles, disabled, email_verified, created_at, last_login_at
               FROM users WHERE id = $1"#,
            id.0,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.map(|r| {
            user_from(
                r.id,
                r.email,
                r.roles,
                r.disabled,
                r.email_verified,
                r.created_at,
                r.last_login_at,
            )
        }))
    }

    async fn list_users(
        &self,
        prefix: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<User>> {
        let rows = sqlx::query!(
            r#"SELECT id, email, roles, disabled, email_verified, created_at, last_login_at
               FROM users
               WHERE email_normalized IS NOT NULL
                 AND ($1::text IS NULL
                      OR (email_normalized >= $1 AND left(email_normalized, length($1)) = $1))
                 AND ($2::text IS NULL OR email_normalized > $2)
               ORDER BY email_normalized
               LIMIT $3"#,
            prefix,
            after,
            limit,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                user_from(
                    r.id,
                    r.email,
                    r.roles,
                    r.disabled,
                    r.email_verified,
                    r.created_at,
                    r.last_login_at,
                )
            })
            .collect())
    }

    async fn replace_password_hash(&self, user: UserId, old: &str, new: &str) -> StoreResult<()> {
        sqlx::query!(
            r#"UPDATE users SET password_hash = $3, updated_at = now()
               WHERE id = $1 AND password_hash = $2"#,
            user.0,
            old,
            new,
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn create_session(&self, new: NewSession<'_>) -> StoreResult<Option<CreatedSession>> {
        // One statement: the session, its first refresh token, the device, and the
        // eviction of the least recently used sessions past the cap (the new one is not
        // visible to the eviction's snapshot, hence cap - 1 others are kept), and the
        // user's `last_login_at`. The row lock makes a concurrent password change,
        // disable or role change wait for this login (and then end its session or mark
        // its token), or makes this login see the change: the roles in the token are the
        // ones read under that lock. It is `FOR NO KEY UPDATE`, not `FOR SHARE`, because
        // the statement writes the row too: two logins holding a share lock and both
        // upgrading it would deadlock; this way logins of one user take turns for the
        // length of one statement.
        // A device token is only ever renewed for the user it belongs to.
        let row = sqlx::query!(
            r#"WITH allowed AS (
                   SELECT id, roles, email_verified FROM users
                   WHERE id = $2 AND password_hash = $10 AND NOT disabled
                   FOR NO KEY UPDATE
               ), session AS (
                   INSERT INTO sessions (id, user_id, remember_me, expires_at,
                                         login_ip, login_user_agent, last_ip, last_user_agent,
                                         chain_hash, auth_time, amr)
                   SELECT $1, id, $3, $4, $5, $6, $5, $6, $13, now(), $15 FROM allowed
                   RETURNING id
               ), login AS (
                   UPDATE users SET last_login_at = now() WHERE id IN (SELECT id FROM allowed)
               ), token AS (
                   INSERT INTO refresh_tokens (token_hash, session_id)
                   SELECT $7, id FROM session
               ), device AS (
                   INSERT INTO devices (token_hash, user_id, expires_at)
                   SELECT $11, id, now() + make_interval(secs => $12::float8) FROM allowed
                   ON CONFLICT (token_hash) DO UPDATE
                       SET last_used_at = now(), expires_at = excluded.expires_at
                       WHERE devices.user_id = excluded.user_id
               ), noticed AS (
                   INSERT INTO outbox (kind, user_id, payload)
                   SELECT 'email', id, $14 FROM allowed WHERE $14::bytea IS NOT NULL
               ), evicted AS (
                   UPDATE sessions SET revoked_at = now(), revoked_reason = 'session_cap'
                   WHERE $8::int4 > 0 AND EXISTS (SELECT 1 FROM allowed) AND id IN (
                       SELECT id FROM sessions
                       WHERE user_id = $2 AND revoked_at IS NULL AND expires_at > now()
                       ORDER BY last_used_at DESC
                       OFFSET greatest($8::int4 - 1, 0)
                   )
                   RETURNING id
               )
               SELECT (SELECT roles FROM allowed) AS roles,
                      coalesce((SELECT email_verified FROM allowed), false) AS "email_verified!",
                      now() AS "issued_at!",
                      ARRAY(SELECT id FROM evicted
                            UNION
                            SELECT id FROM sessions
                            WHERE user_id = $2 AND revoked_reason = 'session_cap'
                              AND revoked_at > now() - make_interval(secs => $9::float8)
                      ) AS "evicted!""#,
            new.id.0,
            new.user_id.0,
            new.remember_me,
            new.expires_at,
            new.client.ip.as_deref(),
            new.client.user_agent.as_deref(),
            new.refresh_hash,
            new.max_per_user as i32,
            new.recent_secs as f64,
            new.password_hash,
            new.device_hash,
            new.device_ttl_secs as f64,
            new.chain_hash,
            new.notice,
            new.amr,
        )
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.roles.map(|roles| CreatedSession {
            grant: Grant {
                session_id: new.id,
                user_id: new.user_id,
                roles,
                email_verified: row.email_verified,
                amr: new.amr.to_vec(),
                auth_time: row.issued_at,
                expires_at: new.expires_at,
                remember_me: new.remember_me,
                issued_at: row.issued_at,
            },
            evicted: session_ids(row.evicted),
        }))
    }

    async fn rotate_refresh(&self, r: Rotation<'_>) -> StoreResult<Option<Grant>> {
        // The conditional UPDATE is the race arbiter: of two requests presenting the same
        // token, the second blocks on the row lock, re-checks `rotated_at IS NULL` after
        // the first commits, matches nothing, and falls back to `refresh_state`.
        // `rotated_at` is the clock once the row lock is held (the `locked` CTE takes it
        // first, so the update's values are computed after any wait), not the
        // transaction's start: a rotation stalled behind a lock must not open its grace
        // window in the past, or a second tab arriving right after it would count as
        // reuse.
        let row = sqlx::query!(
            r#"WITH locked AS (
                   SELECT token_hash, session_id FROM refresh_tokens
                   WHERE token_hash = $1 AND rotated_at IS NULL
                   FOR UPDATE
               ), rotated AS (
                   UPDATE refresh_tokens rt
                   SET rotated_at = clock_timestamp(), successor_hash = $2, successor_sealed = $3
                   FROM locked, sessions s JOIN users u ON u.id = s.user_id
                   WHERE rt.token_hash = locked.token_hash
                     AND s.id = locked.session_id
                     AND s.revoked_at IS NULL
                     AND s.expires_at > now()
                     AND s.last_used_at > now() - make_interval(secs => coalesce(
                             (SELECT min(value::float8) FROM jsonb_each_text($11::text::jsonb)
                              WHERE key = ANY(u.roles)),
                             $4::float8))
                     AND NOT EXISTS (
                             SELECT 1 FROM jsonb_each_text($12::text::jsonb)
                             WHERE key = ANY(u.roles)
                               AND s.created_at <= now() - make_interval(secs => value::float8))
                     AND NOT u.disabled
                     AND (NOT $10::bool OR s.login_user_agent IS NOT DISTINCT FROM $6)
                   RETURNING rt.session_id, s.user_id, s.expires_at, s.remember_me, u.roles,
                             u.email_verified,
                             coalesce(s.auth_time, s.created_at) AS auth_time,
                             coalesce(s.amr, '{pwd}') AS amr
               ), touched AS (
                   UPDATE sessions SET last_used_at = now(), last_ip = $5, last_user_agent = $6,
                                       generation = generation + 1
                   WHERE id = (SELECT session_id FROM rotated)
               ), inserted AS (
                   INSERT INTO refresh_tokens (token_hash, session_id)
                   SELECT $2, session_id FROM rotated
               ), pruned AS (
                   DELETE FROM refresh_tokens old USING rotated
                   WHERE old.session_id = rotated.session_id
                     AND old.token_hash <> $1
                     AND old.rotated_at < now() - make_interval(secs => $8::float8)
               ), audited AS (
                   INSERT INTO audit_events (kind, user_id, session_id, ip, user_agent,
                                             request_id)
                   SELECT $7, user_id, session_id, $5, $6, $13 FROM rotated WHERE $9::bool
               )
               SELECT session_id AS "session_id!", user_id AS "user_id!",
                      expires_at AS "expires_at!", roles AS "roles!",
                      email_verified AS "email_verified!",
                      auth_time AS "auth_time!", amr AS "amr!",
                      remember_me AS "remember_me!", now() AS "issued_at!"
               FROM rotated"#,
            r.token_hash,
            r.successor_hash,
            r.successor_sealed,
            r.idle_ttl_secs as f64,
            r.client.ip.as_deref(),
            r.client.user_agent.as_deref(),
            AuditKind::Refresh.as_str(),
            r.grace_secs as f64,
            r.audit,
            r.bind_user_agent,
            r.idle_by_role,
            r.absolute_by_role,
            r.client.request_id.as_deref(),
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.map(|r| Grant {
            session_id: SessionId(r.session_id),
            user_id: UserId(r.user_id),
            roles: r.roles,
            email_verified: r.email_verified,
            amr: r.amr,
            auth_time: r.auth_time,
            expires_at: r.expires_at,
            remember_me: r.remember_me,
            issued_at: r.issued_at,
        }))
    }

    async fn reauthenticate_session(&self, r: Reauthentication<'_>) -> StoreResult<Option<Grant>> {
        // The statement's snapshot does not see the row it inserts, so the DELETE takes
        // only the tokens from before.
        let row = sqlx::query!(
            r#"WITH reauthenticated AS (
                   UPDATE sessions s
                   SET auth_time = now(), amr = $3, chain_hash = $4, generation = 0,
                       last_used_at = now()
                   FROM users u
                   WHERE s.id = $1 AND s.user_id = $2 AND u.id = s.user_id
                     AND s.revoked_at IS NULL AND s.expires_at > now() AND NOT u.disabled
                   RETURNING s.id, s.user_id, s.expires_at, s.remember_me, s.auth_time,
                             s.amr, u.roles, u.email_verified
               ), replaced AS (
                   DELETE FROM refresh_tokens
                   WHERE session_id IN (SELECT id FROM reauthenticated)
               ), inserted AS (
                   INSERT INTO refresh_tokens (token_hash, session_id)
                   SELECT $5, id FROM reauthenticated
               )
               SELECT id AS "id!", user_id AS "user_id!", expires_at AS "expires_at!",
                      remember_me AS "remember_me!", auth_time AS "auth_time!",
                      amr AS "amr!", roles AS "roles!", email_verified AS "email_verified!",
                      now() AS "issued_at!"
               FROM reauthenticated"#,
            r.session.0,
            r.user.0,
            r.amr,
            r.chain_hash,
            r.refresh_hash,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.map(|r| Grant {
            session_id: SessionId(r.id),
            user_id: UserId(r.user_id),
            roles: r.roles,
            email_verified: r.email_verified,
            amr: r.amr,
            auth_time: r.auth_time,
            expires_at: r.expires_at,
            remember_me: r.remember_me,
            issued_at: r.issued_at,
        }))
    }

    async fn refresh_state(&self, token_hash: &[u8]) -> StoreResult<Option<RefreshState>> {
        let row = sqlx::query!(
            r#"SELECT rt.session_id, rt.rotated_at, rt.successor_sealed,
                      s.user_id, s.expires_at, s.last_used_at,
                      s.revoked_at, s.remember_me, s.login_user_agent, s.created_at,
                      coalesce(s.auth_time, s.created_at) AS "auth_time!",
                      coalesce(s.amr, '{pwd}') AS "amr!",
                      u.roles, u.email_verified, u.disabled, now() AS "now!"
               FROM refresh_tokens rt
               JOIN sessions s ON s.id = rt.session_id
               JOIN users u ON u.id = s.user_id
               WHERE rt.token_hash = $1"#,
            token_hash,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.map(|r| RefreshState {
            grant: Grant {
                session_id: SessionId(r.session_id),
                user_id: UserId(r.user_id),
                roles: r.roles,
                email_verified: r.email_verified,
                amr: r.amr,
                auth_time: r.auth_time,
                expires_at: r.expires_at,
                remember_me: r.remember_me,
                issued_at: r.now,
            },
            rotated_at: r.rotated_at,
            successor_sealed: r.successor_sealed,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
            disabled: r.disabled,
            now: r.now,
            login_user_agent: r.login_user_agent,
            created_at: r.created_at,
        }))
    }

    async fn chain_state(
        &self,
        session: SessionId,
        secret_hash: &[u8],
    ) -> StoreResult<Option<(RefreshState, i64)>> {
        let row = sqlx::query!(
            r#"SELECT s.id, s.user_id, s.expires_at, s.last_used_at, s.revoked_at,
                      s.generation, s.remember_me, s.login_user_agent, s.created_at, u.roles,
                      u.email_verified,
                      u.disabled,
                      coalesce(s.auth_time, s.created_at) AS "auth_time!",
                      coalesce(s.amr, '{pwd}') AS "amr!",
                      now() AS "now!"
               FROM sessions s JOIN users u ON u.id = s.user_id
               WHERE s.id = $1 AND s.chain_hash = $2"#,
            session.0,
            secret_hash,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.map(|r| {
            let state = RefreshState {
                grant: Grant {
                    session_id: SessionId(r.id),
                    user_id: UserId(r.user_id),
                    roles: r.roles,
                    email_verified: r.email_verified,
                    amr: r.amr,
                    auth_time: r.auth_time,
                    expires_at: r.expires_at,
                    remember_me: r.remember_me,
                    issued_at: r.now,
                },
                rotated_at: None,
                successor_sealed: None,
                last_used_at: r.last_used_at,
                revoked_at: r.revoked_at,
                disabled: r.disabled,
                now: r.now,
                login_user_agent: r.login_user_agent,
                created_at: r.created_at,
            };
            (state, r.generation)
        }))
    }

    async fn revoke_session(
        &self,
        id: SessionId,
        reason: &str,
        notice: Option<NoticeFor>,
    ) -> StoreResult<Option<UserId>> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let ended = sqlx::query!(
            r#"UPDATE sessions SET revoked_at = now(), revoked_reason = $2
               WHERE id = $1 AND revoked_at IS NULL
               RETURNING user_id,
                         (SELECT email FROM users WHERE users.id = sessions.user_id) AS "email!""#,
            id.0,
            reason,
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        if let (Some(ended), Some(notice)) = (&ended, notice) {
            let sealed = notice(UserId(ended.user_id), &ended.email);
            enqueue(&mut tx, ended.user_id, &sealed).await?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(ended.map(|e| UserId(e.user_id)))
    }

    async fn revoke_user_sessions(
        &self,
        user: UserId,
        except: Option<SessionId>,
        reason: &str,
        recent_secs: i64,
    ) -> StoreResult<Vec<SessionId>> {
        // The second SELECT reads the snapshot before the UPDATE (CTE semantics), so it
        // finds only sessions ended earlier, within the window.
        let ids = sqlx::query_scalar!(
            r#"WITH ended AS (
                   UPDATE sessions SET revoked_at = now(), revoked_reason = $3
                   WHERE user_id = $1 AND revoked_at IS NULL
                     AND ($2::uuid IS NULL OR id <> $2)
                   RETURNING id
               )
               SELECT id AS "id!" FROM ended
               UNION
               SELECT id FROM sessions
               WHERE user_id = $1 AND ($2::uuid IS NULL OR id <> $2)
                 AND revoked_at > now() - make_interval(secs => $4::float8)"#,
            user.0,
            except.map(|s| s.0),
            reason,
            recent_secs as f64,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(session_ids(ids))
    }

    async fn list_sessions(
        &self,
        user: UserId,
        idle_ttl_secs: i64,
    ) -> StoreResult<Vec<SessionInfo>> {
        let rows = sqlx::query!(
            r#"SELECT id, remember_me, created_at, last_used_at,
                      least(expires_at, last_used_at + make_interval(secs => $2::float8))
                          AS "expires_at!",
                      login_ip, login_user_agent, last_ip, last_user_agent
               FROM sessions
               WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now()
                 AND last_used_at > now() - make_interval(secs => $2::float8)
               ORDER BY last_used_at DESC
               LIMIT 1000"#,
            user.0,
            idle_ttl_secs as f64,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|r| SessionInfo {
                id: SessionId(r.id),
                remember_me: r.remember_me,
                created_at: r.created_at,
                last_used_at: r.last_used_at,
                expires_at: r.expires_at,
                login_ip: r.login_ip,
                login_user_agent: r.login_user_agent,
                last_ip: r.last_ip,
                last_user_agent: r.last_user_agent,
            })
            .collect())
    }

    async fn revoke_own_session(
        &self,
        user: UserId,
        id: SessionId,
        reason: &str,
        recent_secs: i64,
    ) -> StoreResult<bool> {
        let found = sqlx::query_scalar!(
            r#"WITH ended AS (
                   UPDATE sessions SET revoked_at = now(), revoked_reason = $3
                   WHERE id = $2 AND user_id = $1 AND revoked_at IS NULL
                   RETURNING id
               )
               SELECT EXISTS (SELECT 1 FROM ended)
                   OR EXISTS (SELECT 1 FROM sessions
                              WHERE id = $2 AND user_id = $1
                                AND revoked_at > now() - make_interval(secs => $4::float8))
                   AS "found!""#,
            user.0,
            id.0,
            reason,
            recent_secs as f64,
        )
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        Ok(found)
    }

    async fn change_password(
        &self,
        user: UserId,
        old: &str,
        new: &str,
        keep: SessionId,
        notice: Option<&[u8]>,
    ) -> StoreResult<Option<Vec<SessionId>>> {
        // Two statements in one transaction: the second takes its snapshot after the
        // first has waited out any login holding the user row (see create_session), so
        // a session such a login created is ended too.
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let changed = sqlx::query_scalar!(
            r#"UPDATE users SET password_hash = $3, updated_at = now()
               WHERE id = $1 AND password_hash = $2 AND NOT disabled
               RETURNING id"#,
            user.0,
            old,
            new,
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        if changed.is_none() {
            return Ok(None);
        }
        let ended = sqlx::query_scalar!(
            r#"UPDATE sessions SET revoked_at = now(), revoked_reason = 'password_changed'
               WHERE user_id = $1 AND revoked_at IS NULL AND id <> $2
               RETURNING id"#,
            user.0,
            keep.0,
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        if let Some(notice) = notice {
            enqueue(&mut tx, user.0, notice).await?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(Some(session_ids(ended)))
    }

    async fn update_user(
        &self,
        user: UserId,
        change: &UserChange,
    ) -> StoreResult<Option<UserUpdate>> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let demotes = change.disabled == Some(true)
            || change
                .roles
                .as_ref()
                .is_some_and(|r| !r.iter().any(|r| r == crate::domain::ADMIN_ROLE));
        if demotes && last_admin(&mut tx, user).await? {
            return Err(StoreError::LastAdmin);
        }
        let Some(row) = sqlx::query!(
            r#"UPDATE users u
               SET disabled = coalesce($2, u.disabled),
                   roles = coalesce($3, u.roles),
                   updated_at = now()
               FROM (SELECT id, roles FROM users WHERE id = $1 FOR UPDATE) old
               WHERE u.id = old.id
               RETURNING u.id, u.email, u.roles, u.disabled, u.email_verified, u.created_at, u.last_login_at,
                         old.roles AS old_roles"#,
            user.0,
            change.disabled,
            change.roles.as_deref(),
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?
        else {
            return Ok(None);
        };
        let ended = if row.disabled {
            sqlx::query_scalar!(
                r#"UPDATE sessions SET revoked_at = now(), revoked_reason = 'user_disabled'
                   WHERE user_id = $1 AND revoked_at IS NULL
                   RETURNING id"#,
                user.0,
            )
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?
        } else {
            Vec::new()
        };
        tx.commit().await.map_err(classify)?;
        let roles_changed = super::roles_differ(&row.old_roles, &row.roles);
        Ok(Some(UserUpdate {
            user: user_from(
                row.id,
                row.email,
                row.roles,
                row.disabled,
                row.email_verified,
                row.created_at,
                row.last_login_at,
            ),
            roles_changed,
            ended: session_ids(ended),
        }))
    }

    async fn issue_email_token(
        &self,
        user: UserId,
        grant: EmailTokenGrant<'_>,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // Locks the user row: two requests for the same user take turns, and the newest
        // token is the only one left.
        let exists = sqlx::query_scalar!("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user.0)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?
            .is_some();
        if !exists {
            return Ok(false);
        }
        sqlx::query!(
            "DELETE FROM email_tokens WHERE user_id = $1 AND kind = $2 AND used_at IS NULL",
            user.0,
            grant.kind.as_str(),
        )
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        insert_email_token(&mut tx, user.0, &grant).await?;
        tx.commit().await.map_err(classify)?;
        Ok(true)
    }

    async fn verify_email(&self, token_hash: &[u8]) -> StoreResult<Result<UserId, TokenRefusal>> {
        let used = sqlx::query_scalar!(
            r#"WITH used AS (
                   UPDATE email_tokens SET used_at = now()
                   WHERE token_hash = $1 AND kind = 'verify_email' AND used_at IS NULL
                     AND expires_at > now()
                   RETURNING user_id
               )
               UPDATE users u SET email_verified = true, updated_at = now()
               FROM used WHERE u.id = used.user_id
               RETURNING u.id"#,
            token_hash,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        if let Some(user) = used {
            return Ok(Ok(UserId(user)));
        }
        let mut conn = self.pool.acquire().await.map_err(classify)?;
        Ok(Err(
            token_refusal(&mut conn, token_hash, "verify_email").await?
        ))
    }

    async fn confirm_email_change(
        &self,
        token_hash: &[u8],
    ) -> StoreResult<Result<User, TokenRefusal>> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let used = sqlx::query!(
            r#"UPDATE email_tokens SET used_at = now()
               WHERE token_hash = $1 AND kind = 'confirm_email_change' AND used_at IS NULL
                 AND expires_at > now()
               RETURNING user_id, new_email AS "new_email!", new_email_normalized AS "norm!""#,
            token_hash,
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        let Some(used) = used else {
            return Ok(Err(token_refusal(
                &mut tx,
                token_hash,
                "confirm_email_change",
            )
            .await?));
        };
        // A taken address is a unique violation: Conflict, and the transaction (the
        // token's use included) rolls back.
        let row = sqlx::query!(
            r#"UPDATE users SET email = $2, email_normalized = $3, email_verified = true,
                                updated_at = now()
               WHERE id = $1
               RETURNING id, email, roles, disabled, email_verified, created_at, last_login_at"#,
            used.user_id,
            used.new_email,
            used.norm,
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(Ok(user_from(
            row.id,
            row.email,
            row.roles,
            row.disabled,
            row.email_verified,
            row.created_at,
            row.last_login_at,
        )))
    }

    async fn email_taken(&self, email: &Email, except: UserId) -> StoreResult<bool> {
        sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM users WHERE email_normalized = $1 AND id <> $2)
               AS "taken!""#,
            email.normalized(),
            except.0,
        )
        .fetch_one(&self.pool)
        .await
        .map_err(classify)
    }

    async fn reset_password(
        &self,
        token_hash: &[u8],
        new_hash: &str,
        notice: Option<NoticeFor>,
    ) -> StoreResult<Result<PasswordReset, TokenRefusal>> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let used = sqlx::query_scalar!(
            r#"UPDATE email_tokens SET used_at = now()
               WHERE token_hash = $1 AND kind = 'reset_password' AND used_at IS NULL
                 AND expires_at > now()
               RETURNING user_id"#,
            token_hash,
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        let Some(user) = used else {
            return Ok(Err(
                token_refusal(&mut tx, token_hash, "reset_password").await?
            ));
        };
        let changed = sqlx::query!(
            r#"UPDATE users SET password_hash = $2, email_verified = true, updated_at = now()
               WHERE id = $1 RETURNING email, email_normalized"#,
            user,
            new_hash,
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        if let (Some(notice), Some(to)) = (notice, &changed.email) {
            enqueue(&mut tx, user, &notice(UserId(user), to)).await?;
        }
        let ended = sqlx::query_scalar!(
            r#"UPDATE sessions SET revoked_at = now(), revoked_reason = 'password_reset'
               WHERE user_id = $1 AND revoked_at IS NULL
               RETURNING id"#,
            user,
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(Ok(PasswordReset {
            user: UserId(user),
            // A reset token is only ever issued to a user with an email.
            email_normalized: changed.email_normalized.unwrap_or_default(),
            ended: session_ids(ended),
        }))
    }

    async fn delete_user(&self, user: UserId) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        if last_admin(&mut tx, user).await? {
            return Err(StoreError::LastAdmin);
        }
        let deleted = delete_user_rows(&mut tx, user.0).await?;
        tx.commit().await.map_err(classify)?;
        Ok(deleted)
    }

    async fn totp(&self, user: UserId) -> StoreResult<Option<TotpRow>> {
        let row = sqlx::query!(
            r#"SELECT secret_sealed, confirmed_at IS NOT NULL AS "confirmed!", last_step
               FROM mfa_totp WHERE user_id = $1"#,
            user.0,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.map(|r| TotpRow {
            secret_sealed: r.secret_sealed,
            confirmed: r.confirmed,
            last_step: r.last_step,
        }))
    }

    async fn start_totp(&self, user: UserId, secret_sealed: &[u8]) -> StoreResult<bool> {
        let done = sqlx::query!(
            r#"INSERT INTO mfa_totp (user_id, secret_sealed) VALUES ($1, $2)
               ON CONFLICT (user_id) DO UPDATE
                   SET secret_sealed = excluded.secret_sealed, created_at = now()
                   WHERE mfa_totp.confirmed_at IS NULL"#,
            user.0,
            secret_sealed,
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected() > 0)
    }

    async fn confirm_totp(
        &self,
        user: UserId,
        step: i64,
        recovery_hashes: &[Vec<u8>],
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let confirmed = sqlx::query!(
            r#"UPDATE mfa_totp SET confirmed_at = now(), last_step = $2
               WHERE user_id = $1 AND confirmed_at IS NULL"#,
            user.0,
            step,
        )
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected()
            > 0;
        if !confirmed {
            return Ok(false);
        }
        sqlx::query!("DELETE FROM mfa_recovery_codes WHERE user_id = $1", user.0)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        sqlx::query!(
            r#"INSERT INTO mfa_recovery_codes (user_id, code_hash)
               SELECT $1, unnest($2::bytea[])"#,
            user.0,
            recovery_hashes,
        )
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(true)
    }

    async fn use_totp_step(&self, user: UserId, step: i64) -> StoreResult<bool> {
        let done = sqlx::query!(
            r#"UPDATE mfa_totp SET last_step = $2
               WHERE user_id = $1 AND confirmed_at IS NOT NULL AND last_step < $2"#,
            user.0,
            step,
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected() > 0)
    }

    async fn use_recovery_code(&self, user: UserId, code_hash: &[u8]) -> StoreResult<Option<i64>> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let used = sqlx::query!(
            r#"UPDATE mfa_recovery_codes SET used_at = now()
               WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL"#,
            user.0,
            code_hash,
        )
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if used == 0 {
            return Ok(None);
        }
        let left = sqlx::query_scalar!(
            r#"SELECT count(*) AS "left!" FROM mfa_recovery_codes
               WHERE user_id = $1 AND used_at IS NULL"#,
            user.0,
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(Some(left))
    }

    async fn remove_totp(
        &self,
        user: UserId,
        keep: Option<SessionId>,
    ) -> StoreResult<Option<Vec<SessionId>>> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let removed = sqlx::query!("DELETE FROM mfa_totp WHERE user_id = $1", user.0)
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
        if removed == 0 {
            return Ok(None);
        }
        sqlx::query!("DELETE FROM mfa_recovery_codes WHERE user_id = $1", user.0)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let ended = sqlx::query_scalar!(
            r#"UPDATE sessions SET revoked_at = now(), revoked_reason = 'mfa_removed'
               WHERE user_id = $1 AND revoked_at IS NULL
                 AND ($2::uuid IS NULL OR id <> $2)
               RETURNING id"#,
            user.0,
            keep.map(|s| s.0),
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(Some(session_ids(ended)))
    }

    async fn create_mfa_challenge(
        &self,
        token_hash: &[u8],
        c: &MfaChallenge,
        ttl_secs: i64,
    ) -> StoreResult<()> {
        sqlx::query!(
            r#"INSERT INTO mfa_challenges (token_hash, user_id, password_hash, remember_me,
                                           cookie, device_sealed, expires_at)
               VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7::float8))"#,
            token_hash,
            c.user_id.0,
            c.password_hash,
            c.remember_me,
            c.cookie,
            c.device_sealed,
            ttl_secs as f64,
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn mfa_challenge(&self, token_hash: &[u8]) -> StoreResult<Option<MfaChallenge>> {
        let row = sqlx::query!(
            r#"SELECT user_id, password_hash, remember_me, cookie, device_sealed, failures
               FROM mfa_challenges WHERE token_hash = $1 AND expires_at > now()"#,
            token_hash,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.map(|r| MfaChallenge {
            user_id: UserId(r.user_id),
            password_hash: r.password_hash,
            remember_me: r.remember_me,
            cookie: r.cookie,
            device_sealed: r.device_sealed,
            failures: r.failures,
        }))
    }

    async fn fail_mfa_challenge(&self, token_hash: &[u8]) -> StoreResult<i32> {
        let failures = sqlx::query_scalar!(
            r#"UPDATE mfa_challenges SET failures = failures + 1
               WHERE token_hash = $1 RETURNING failures"#,
            token_hash,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(failures.unwrap_or(0))
    }

    async fn take_mfa_challenge(&self, token_hash: &[u8]) -> StoreResult<bool> {
        let done = sqlx::query!(
            "DELETE FROM mfa_challenges WHERE token_hash = $1 AND expires_at > now()",
            token_hash,
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_expired_mfa_challenges(&self, batch: i64) -> StoreResult<u64> {
        let done = sqlx::query!(
            r#"DELETE FROM mfa_challenges WHERE token_hash IN (
                   SELECT token_hash FROM mfa_challenges WHERE expires_at < now()
                   LIMIT $1
                   FOR UPDATE SKIP LOCKED
               )"#,
            batch,
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected())
    }

    async fn applied_user_migrations(&self) -> StoreResult<Vec<UserMigrationRecord>> {
        let rows =
            sqlx::query!("SELECT version, name, checksum FROM user_migrations ORDER BY version")
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|r| UserMigrationRecord {
                version: r.version,
                name: r.name,
                checksum: r.checksum,
            })
            .collect())
    }

    async fn apply_user_migration(
        &self,
        record: &UserMigrationRecord,
        ops: &[UserOp],
        dry_run: bool,
    ) -> StoreResult<Result<MigrationEffects, OpFailure>> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let mut effects = MigrationEffects::default();
        for (i, op) in ops.iter().enumerate() {
            if let Err(reason) = apply_user_op(&mut tx, op, &mut effects).await? {
                // Dropping the transaction rolls the whole file back.
                return Ok(Err(OpFailure {
                    operation: i + 1,
                    reason,
                }));
            }
        }
        let recorded = sqlx::query!(
            r#"INSERT INTO user_migrations (version, name, checksum) VALUES ($1, $2, $3)
               ON CONFLICT (version) DO NOTHING"#,
            record.version,
            record.name,
            record.checksum,
        )
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if recorded == 0 {
            // Another `tessera migrate` applied it meanwhile.
            return Err(StoreError::Conflict);
        }
        if dry_run {
            tx.rollback().await.map_err(classify)?;
        } else {
            tx.commit().await.map_err(classify)?;
        }
        Ok(Ok(effects))
    }

    async fn claim_outbox(&self, limit: i64, lease_secs: i64) -> StoreResult<Vec<OutboxRow>> {
        let rows = sqlx::query!(
            r#"UPDATE outbox o
               SET claimed_until = now() + make_interval(secs => $2::float8),
                   attempts = o.attempts + 1
               FROM (SELECT id FROM outbox
                     WHERE next_attempt_at <= now()
                       AND (claimed_until IS NULL OR claimed_until < now())
                     ORDER BY id
                     LIMIT $1
                     FOR UPDATE SKIP LOCKED) due
               WHERE o.id = due.id
               RETURNING o.id, o.kind, o.payload, o.attempts, o.created_at"#,
            limit,
            lease_secs as f64,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        let mut rows: Vec<OutboxRow> = rows
            .into_iter()
            .map(|r| OutboxRow {
                id: r.id,
                kind: r.kind,
                payload: r.payload,
                attempts: r.attempts,
                created_at: r.created_at,
            })
            .collect();
        rows.sort_by_key(|r| r.id);
        Ok(rows)
    }

    async fn delete_outbox(&self, id: i64) -> StoreResult<()> {
        sqlx::query!("DELETE FROM outbox WHERE id = $1", id)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn retry_outbox(&self, id: i64, after_secs: i64) -> StoreResult<()> {
        sqlx::query!(
            r#"UPDATE outbox
               SET claimed_until = NULL,
                   next_attempt_at = now() + make_interval(secs => $2::float8)
               WHERE id = $1"#,
            id,
            after_secs as f64,
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn abandon_outbox(&self, id: i64, event: AuditEvent<'_>) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        sqlx::query!("DELETE FROM outbox WHERE id = $1", id)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        insert_audit(&mut tx, &event).await?;
        tx.commit().await.map_err(classify)
    }

    async fn outbox_len(&self) -> StoreResult<i64> {
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM outbox"#)
            .fetch_one(&self.pool)
            .await
            .map_err(classify)
    }

    async fn record_audit(&self, e: AuditEvent<'_>) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await.map_err(classify)?;
        insert_audit(&mut conn, &e).await
    }

    async fn record_event(&self, e: AuditEvent<'_>, webhooks: Vec<Vec<u8>>) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        insert_audit(&mut tx, &e).await?;
        for payload in &webhooks {
            sqlx::query!(
                "INSERT INTO outbox (kind, payload) VALUES ('webhook', $1)",
                payload
            )
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }

    async fn login_origins(&self, user: UserId, limit: i64) -> StoreResult<Vec<ClientInfo>> {
        let rows = sqlx::query!(
            r#"SELECT ip, user_agent FROM audit_events
               WHERE user_id = $1
                 AND (kind = 'login_succeeded' OR (kind = 'user_created' AND actor_id IS NULL))
               ORDER BY id DESC
               LIMIT $2"#,
            user.0,
            limit,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|r| ClientInfo {
                ip: r.ip,
                user_agent: r.user_agent,
                request_id: None,
            })
            .collect())
    }

    async fn list_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
        let (before_id, before_time) = match q.before {
            Some(AuditCursor::Id(id)) => (Some(id), None),
            Some(AuditCursor::Time(t)) => (None, Some(t)),
            None => (None, None),
        };
        let rows = sqlx::query_as!(
            AuditRecord,
            r#"SELECT id, occurred_at, kind, user_id, session_id, actor_id, ip, user_agent,
                      detail, request_id
               FROM audit_events
               WHERE ($1::uuid IS NULL OR user_id = $1 OR actor_id = $1)
                 AND ($2::int8 IS NULL OR id < $2)
                 AND ($3::timestamptz IS NULL OR occurred_at < $3)
               ORDER BY id DESC
               LIMIT $4"#,
            q.user.map(|u| u.0),
            before_id,
            before_time,
            q.limit,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(rows)
    }

    async fn delete_ended_sessions(
        &self,
        idle_ttl_secs: i64,
        retention_secs: i64,
        batch: i64,
    ) -> StoreResult<u64> {
        let done = sqlx::query!(
            r#"WITH doomed AS (
                   SELECT id FROM sessions
                   WHERE revoked_at < now() - make_interval(secs => $2::float8)
                      OR expires_at < now() - make_interval(secs => $2::float8)
                      OR last_used_at < now() - make_interval(secs => $1::float8 + $2::float8)
                   LIMIT $3
                   FOR UPDATE SKIP LOCKED
               )
               DELETE FROM sessions s USING doomed WHERE s.id = doomed.id"#,
            idle_ttl_secs as f64,
            retention_secs as f64,
            batch,
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected())
    }

    async fn save_mark(
        &self,
        key: &str,
        value: i64,
        expires_at: chrono::DateTime<chrono::Utc>,
    ) -> StoreResult<bool> {
        let inserted = sqlx::query_scalar!(
            r#"INSERT INTO revocation_marks (key, value, expires_at) VALUES ($1, $2, $3)
               ON CONFLICT (key) DO UPDATE
                 SET value = GREATEST(revocation_marks.value, EXCLUDED.value),
                     expires_at = GREATEST(revocation_marks.expires_at, EXCLUDED.expires_at)
               RETURNING (xmax = 0) AS "inserted!""#,
            key,
            value,
            expires_at,
        )
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        Ok(inserted)
    }

    async fn live_marks(&self, session_mark_secs: i64) -> StoreResult<Vec<SavedMark>> {
        let rows = sqlx::query!(
            r#"SELECT key AS "key!", value AS "value!", expires_at AS "expires_at!"
               FROM revocation_marks WHERE expires_at > now()
               UNION ALL
               SELECT 'revoked:sid:' || id::text, 1::bigint,
                      revoked_at + make_interval(secs => $1::float8)
               FROM sessions
               WHERE revoked_at > now() - make_interval(secs => $1::float8)"#,
            session_mark_secs as f64,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|r| SavedMark {
                key: r.key,
                value: r.value,
                expires_at: r.expires_at,
            })
            .collect())
    }

    async fn delete_expired_marks(&self, batch: i64) -> StoreResult<u64> {
        let done = sqlx::query!(
            r#"DELETE FROM revocation_marks WHERE key IN (
                   SELECT key FROM revocation_marks WHERE expires_at < now()
                   LIMIT $1
                   FOR UPDATE SKIP LOCKED
               )"#,
            batch,
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected())
    }

    async fn claim_single_instance(&self) -> StoreResult<bool> {
        let mut claim = self.claim.lock().await;
        if claim.is_some() {
            return Ok(true);
        }
        // Out of the pool: it is kept for the life of the process.
        let mut conn = self.pool.acquire().await.map_err(classify)?.detach();
        // A session-level advisory lock: held while this connection lives, released by
        // PostgreSQL when the process (and so the connection) goes away.
        let got = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_lock(hashtext('tessera:in-process-revocations')) AS "got!""#
        )
        .fetch_one(&mut conn)
        .await
        .map_err(classify)?;
        if got {
            *claim = Some(conn);
        }
        Ok(got)
    }

    async fn delete_expired_devices(&self, batch: i64) -> StoreResult<u64> {
        let done = sqlx::query!(
            r#"DELETE FROM devices WHERE token_hash IN (
                   SELECT token_hash FROM devices WHERE expires_at < now()
                   LIMIT $1
                   FOR UPDATE SKIP LOCKED
               )"#,
            batch,
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected())
    }

    async fn delete_old_email_tokens(&self, retention_secs: i64, batch: i64) -> StoreResult<u64> {
        let done = sqlx::query!(
            r#"DELETE FROM email_tokens WHERE token_hash IN (
                   SELECT token_hash FROM email_tokens
                   WHERE expires_at < now() - make_interval(secs => $1::float8)
                   LIMIT $2
                   FOR UPDATE SKIP LOCKED
               )"#,
            retention_secs as f64,
            batch,
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected())
    }

    async fn delete_old_audit(&self, retention_secs: i64, batch: i64) -> StoreResult<u64> {
        let done = sqlx::query!(
            r#"DELETE FROM audit_events WHERE id IN (
                   SELECT id FROM audit_events
                   WHERE occurred_at < now() - make_interval(secs => $1::float8)
                   LIMIT $2
                   FOR UPDATE SKIP LOCKED
               )"#,
            retention_secs as f64,
            batch,
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected())
    }
}

async fn insert_audit(conn: &mut sqlx::PgConnection, e: &AuditEvent<'_>) -> StoreResult<()> {
    let ClientInfo {
        ip,
        user_agent,
        request_id,
    } = e.client;
    sqlx::query!(
        r#"INSERT INTO audit_events (kind, user_id, session_id, actor_id, ip, user_agent,
                                     detail, request_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"#,
        e.kind.as_str(),
        e.user_id.map(|u| u.0),
        e.session_id.map(|s| s.0),
        e.actor_id.map(|u| u.0),
        ip.as_deref(),
        user_agent.as_deref(),
        &e.detail,
        request_id.as_deref(),
    )
    .execute(conn)
    .await
    .map_err(classify)?;
    Ok(())
}

/// Stores an emailed token and its outbox row (the caller's transaction).
async fn insert_email_token(
    conn: &mut sqlx::PgConnection,
    user: Uuid,
    grant: &EmailTokenGrant<'_>,
) -> StoreResult<()> {
    let normalized = grant.new_email.map(|e| e.normalized());
    sqlx::query!(
        r#"INSERT INTO email_tokens (token_hash, user_id, kind, new_email, new_email_normalized,
                                     expires_at)
           VALUES ($1, $2, $3, $4, $5, $6)"#,
        grant.token_hash,
        user,
        grant.kind.as_str(),
        grant.new_email.map(|e| e.as_str()),
        normalized.as_deref(),
        grant.expires_at,
    )
    .execute(&mut *conn)
    .await
    .map_err(classify)?;
    for payload in std::iter::once(grant.message).chain(grant.notice) {
        enqueue(conn, user, payload).await?;
    }
    Ok(())
}

/// Writes an email about `user` to the outbox, in the caller's transaction.
async fn enqueue(conn: &mut sqlx::PgConnection, user: Uuid, payload: &[u8]) -> StoreResult<()> {
    sqlx::query!(
        "INSERT INTO outbox (kind, user_id, payload) VALUES ('email', $1, $2)",
        user,
        payload,
    )
    .execute(&mut *conn)
    .await
    .map_err(classify)?;
    Ok(())
}

/// Why an emailed token of `kind` could not be used, from its row.
async fn token_refusal(
    conn: &mut sqlx::PgConnection,
    token_hash: &[u8],
    kind: &str,
) -> StoreResult<TokenRefusal> {
    let row = sqlx::query!(
        r#"SELECT used_at IS NOT NULL AS "used!", expires_at <= now() AS "expired!"
           FROM email_tokens WHERE token_hash = $1 AND kind = $2"#,
        token_hash,
        kind,
    )
    .fetch_optional(conn)
    .await
    .map_err(classify)?;
    Ok(refusal(row.map(|r| (r.used, r.expired))))
}

/// Whether `user` is the only enabled admin. Locks every enabled admin's row for the
/// rest of the transaction, so two admins demoting each other take turns and the second
/// finds itself the last.
/// Deletes a user and everything of theirs (see `Store::delete_user`); false if there
/// was none.
async fn delete_user_rows(conn: &mut sqlx::PgConnection, user: Uuid) -> StoreResult<bool> {
    sqlx::query!("DELETE FROM outbox WHERE user_id = $1", user)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
    sqlx::query!(
        r#"UPDATE audit_events SET ip = NULL, user_agent = NULL
           WHERE user_id = $1 OR actor_id = $1"#,
        user,
    )
    .execute(&mut *conn)
    .await
    .map_err(classify)?;
    // Sessions (and their refresh tokens), devices and emailed tokens cascade.
    let deleted = sqlx::query!("DELETE FROM users WHERE id = $1", user)
        .execute(&mut *conn)
        .await
        .map_err(classify)?
        .rows_affected();
    Ok(deleted > 0)
}

/// One user migration operation in the caller's transaction: `Err` with why it cannot
/// be done (the caller rolls the file back).
async fn apply_user_op(
    conn: &mut sqlx::PgConnection,
    op: &UserOp,
    effects: &mut MigrationEffects,
) -> StoreResult<Result<(), String>> {
    let email = match op {
        UserOp::Create {
            email,
            password_hash,
            roles,
            invitation,
        } => {
            let id = sqlx::query_scalar!(
                r#"INSERT INTO users (id, email, email_normalized, password_hash, roles)
                   VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT DO NOTHING
                   RETURNING id"#,
                Uuid::new_v4(),
                email.as_str(),
                email.normalized(),
                password_hash,
                roles,
            )
            .fetch_optional(&mut *conn)
            .await
            .map_err(classify)?;
            let Some(id) = id else {
                return Ok(Err(format!("a user with email {} exists", email.as_str())));
            };
            if let Some(invitation) = invitation {
                insert_email_token(conn, id, &invitation.grant()).await?;
            }
            return Ok(Ok(()));
        }
        UserOp::Grant { email, .. }
        | UserOp::Revoke { email, .. }
        | UserOp::Disable { email }
        | UserOp::Delete { email } => email,
    };
    let Some(id) = sqlx::query_scalar!(
        "SELECT id FROM users WHERE email_normalized = $1 FOR UPDATE",
        email.normalized(),
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(classify)?
    else {
        return Ok(Err(format!(
            "there is no user with email {}",
            email.as_str()
        )));
    };
    let removes_admin = match op {
        UserOp::Revoke { role, .. } => role == crate::domain::ADMIN_ROLE,
        UserOp::Disable { .. } | UserOp::Delete { .. } => true,
        _ => false,
    };
    if removes_admin && last_admin(conn, UserId(id)).await? {
        return Ok(Err(format!(
            "{} is the last enabled admin; make another user admin first",
            email.as_str()
        )));
    }
    let changed = match op {
        UserOp::Grant { role, .. } => {
            sqlx::query!(
                r#"UPDATE users
                   SET roles = ARRAY(SELECT r FROM unnest(array_append(roles, $2)) AS r ORDER BY r),
                       updated_at = now()
                   WHERE id = $1 AND NOT ($2 = ANY (roles))"#,
                id,
                role,
            )
            .execute(&mut *conn)
            .await
            .map_err(classify)?
            .rows_affected()
                > 0
        }
        UserOp::Revoke { role, .. } => {
            sqlx::query!(
                r#"UPDATE users SET roles = array_remove(roles, $2), updated_at = now()
                   WHERE id = $1 AND $2 = ANY (roles)"#,
                id,
                role,
            )
            .execute(&mut *conn)
            .await
            .map_err(classify)?
            .rows_affected()
                > 0
        }
        UserOp::Disable { .. } => {
            let disabled = sqlx::query!(
                "UPDATE users SET disabled = true, updated_at = now() WHERE id = $1 AND NOT disabled",
                id,
            )
            .execute(&mut *conn)
            .await
            .map_err(classify)?
            .rows_affected()
                > 0;
            let ended = sqlx::query_scalar!(
                r#"UPDATE sessions SET revoked_at = now(), revoked_reason = 'user_disabled'
                   WHERE user_id = $1 AND revoked_at IS NULL
                   RETURNING id"#,
                id,
            )
            .fetch_all(&mut *conn)
            .await
            .map_err(classify)?;
            effects.ended.extend(session_ids(ended));
            disabled
        }
        UserOp::Delete { .. } => delete_user_rows(conn, id).await?,
        UserOp::Create { .. } => unreachable!("handled above"),
    };
    if changed {
        effects.users.push(UserId(id));
    }
    Ok(Ok(()))
}

async fn last_admin(conn: &mut sqlx::PgConnection, user: UserId) -> StoreResult<bool> {
    let admins = sqlx::query_scalar!(
        r#"SELECT id FROM users WHERE 'admin' = ANY (roles) AND NOT disabled
           ORDER BY id FOR UPDATE"#
    )
    .fetch_all(conn)
    .await
    .map_err(classify)?;
    Ok(admins == [user.0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn database(vars: &[(&str, &str)]) -> anyhow::Result<DatabaseSettings> {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Ok(Settings::load_from(None, vars)?.database)
    }

    fn ca_file() -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("tessera-ca-{}.pem", Uuid::new_v4()));
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        path
    }

    #[test]
    fn sslmode_from_the_settings_overrides_the_url() {
        let url = (
            "TESSERA__DATABASE__URL",
            "postgres://u@db.example.com/t?sslmode=disable",
        );
        let from_url = connect_options(&database(&[url]).unwrap()).unwrap();
        assert!(matches!(from_url.get_ssl_mode(), PgSslMode::Disable));
        let set = database(&[url, ("TESSERA__DATABASE__SSLMODE", "verify-full")]).unwrap();
        let options = connect_options(&set).unwrap();
        assert!(matches!(options.get_ssl_mode(), PgSslMode::VerifyFull));
        assert!(database(&[("TESSERA__DATABASE__SSLMODE", "sometimes")]).is_err());
    }

    #[test]
    fn a_ca_file_makes_require_verify_and_is_refused_where_nothing_is_verified() {
        let ca = ca_file();
        let ca = ca.to_str().unwrap();
        let url = ("TESSERA__DATABASE__URL", "postgres://u@db.example.com/t");
        let with = |mode| {
            database(&[
                url,
                ("TESSERA__DATABASE__SSLMODE", mode),
                ("TESSERA__DATABASE__CA_FILE", ca),
            ])
            .unwrap()
        };
        let options = connect_options(&with("require")).unwrap();
        assert!(matches!(options.get_ssl_mode(), PgSslMode::VerifyCa));
        let options = connect_options(&with("verify-full")).unwrap();
        assert!(matches!(options.get_ssl_mode(), PgSslMode::VerifyFull));
        for mode in ["prefer", "disable"] {
            let err = connect_options(&with(mode)).unwrap_err().to_string();
            assert!(
                err.contains("never checks the server's certificate"),
                "{err}"
            );
        }
        let missing =
            database(&[url, ("TESSERA__DATABASE__CA_FILE", "/nonexistent/ca.pem")]).unwrap();
        let err = format!("{:#}", connect_options(&missing).unwrap_err());
        assert!(err.contains("cannot read database.ca_file"), "{err}");
        std::fs::remove_file(ca).unwrap();
    }
}
