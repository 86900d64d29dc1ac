//! The SQLite [`Store`]: the embedded default (`database.url = "sqlite://…"`).
//!
//! The same behaviour as [`super::postgres::PgStore`], built the way SQLite wants:
//!
//! - **One writer.** A thread of its own owns the write connection and runs the writes
//!   requests hand it in `BEGIN IMMEDIATE` transactions, several at once when they
//!   queue up (group commit, see [`writer`]): the connection never changes hands and a
//!   transaction never has to upgrade a read lock (no deadlock, no `SQLITE_BUSY`
//!   mid-way). Other processes on the file (`tessera backup`, the CLI) wait on
//!   `busy_timeout`.
//! - **Many readers.** WAL mode: reads run on the reader pool beside the writer and see
//!   every committed write.
//! - **Statements, not CTEs.** SQLite has no data-modifying CTEs and no row locks, so
//!   what PostgreSQL does in one locking statement is a few statements inside one
//!   write transaction (a rotation's sent as one command); holding the write lock is
//!   what makes them atomic, so of two rotations of one token exactly one wins, as on
//!   PostgreSQL.
//! - **One clock.** Times are the process clock, read inside the write transaction (the
//!   order argument of docs/design.md, "Privilege races", then holds as it does with the
//!   database clock), stored as INTEGER microseconds; ids are TEXT; roles a JSON array.
//!
//! Every query is compile-time checked against `migrations/sqlite/` (`.sqlx/`).

/// An [`AuditRecord`] from a row of `audit_events` (any query selecting its columns).
macro_rules! audit_record {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, StoreError>(AuditRecord {
            id: r.id,
            occurred_at: time(r.occurred_at),
            kind: r.kind,
            user_id: opt_uuid(r.user_id)?,
            session_id: opt_uuid(r.session_id)?,
            actor_id: opt_uuid(r.actor_id)?,
            ip: r.ip,
            user_agent: r.user_agent,
            detail: serde_json::from_str(&r.detail).unwrap_or_default(),
            request_id: r.request_id,
        })
    }};
}

pub mod export;
mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::{
    AuditCursor, AuditEvent, AuditKind, AuditQuery, AuditRecord, ClientInfo, CreatedSession,
    Credentials, EmailTokenGrant, Grant, MfaChallenge, MigrationEffects, NewSession, NoticeFor,
    OpFailure, OutboxRow, PasswordReset, Reauthentication, RefreshState, Rotation, SavedMark,
    SessionInfo, Store, StoreError, StoreResult, TokenRefusal, TotpRow, User, UserChange,
    UserMigrationRecord, UserOp, UserUpdate, refusal,
};
use crate::config::DatabaseSettings;
use crate::domain::{ANONYMOUS_ROLE, Email, SessionId, UserId};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

/// How much of the file is read through a memory map (256 MiB).
const MMAP_SIZE: u64 = 256 << 20;

/// How long a writer from another process (a backup, the CLI) is waited for.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct SqliteStore {
    reader: SqlitePool,
    /// The one writer (see [`writer`]).
    writer: writer::Writer,
    file: PathBuf,
    /// The lock file held while this process keeps revocations in process.
    claim: Arc<Mutex<Option<std::fs::File>>>,
}

impl SqliteStore {
    /// Pools that open the file on first use (it exists once [`SqliteStore::prepare`]
    /// ran).
    pub fn connect_lazy(settings: &DatabaseSettings) -> anyhow::Result<Self> {
        let options = connect_options(settings)?;
        let file = options.get_filename().to_owned();
        let acquire = Duration::from_millis(settings.acquire_timeout_ms);
        // A connection to a local file does not go stale: no ping before each use (one
        // round trip to the connection's thread saved per request).
        let reader = SqlitePoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(acquire)
            .test_before_acquire(false)
            .connect_lazy_with(options.clone());
        let writer = writer::Writer::start(move || {
            SqlitePoolOptions::new()
                .max_connections(1)
                .test_before_acquire(false)
                .connect_lazy_with(options)
        })?;
        Ok(SqliteStore {
            reader,
            writer,
            file,
            claim: Default::default(),
        })
    }

    /// Creates the database file (and its directory, mode 0700) if missing, then
    /// migrates.
    pub async fn prepare(settings: &DatabaseSettings, migrate: bool) -> anyhow::Result<()> {
        let options = connect_options(settings)?;
        let file = options.get_filename().to_owned();
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        let mut conn = options
            .create_if_missing(settings.create_database)
            .connect()
            .await
            .with_context(|| {
                format!(
                    "cannot open the SQLite database {}; does its directory exist and may \
                     this user write there? (database.url, TESSERA__DATABASE__URL)",
                    file.display()
                )
            })?;
        if migrate {
            MIGRATOR
                .run(&mut conn)
                .await
                .context("running migrations failed")?;
        }
        conn.close().await.ok();
        Ok(())
    }

    /// The database file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The database file `settings` name (as `database.url` is read to open it).
    pub fn file_of(settings: &DatabaseSettings) -> anyhow::Result<PathBuf> {
        Ok(connect_options(settings)?.get_filename().to_owned())
    }

    /// The reader pool, e.g. for `tessera copy`.
    pub fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    /// One statement in a write transaction; returns the rows it changed.
    async fn write_one(&self, statement: SqliteQuery<'static>) -> StoreResult<u64> {
        self.writer
            .write(Box::new(move |conn| {
                Box::pin(async move { Ok(statement.execute(&mut *conn).await?.rows_affected()) })
            }))
            .await
    }

    /// Makes a consistent copy of the live database at `to` (`VACUUM INTO`, which
    /// reads one snapshot: writers go on meanwhile); `to` must not exist.
    pub async fn backup(&self, to: &Path) -> anyhow::Result<()> {
        let to = to
            .to_str()
            .context("the backup path is not valid UTF-8")?
            .to_owned();
        let mut conn = self.reader.acquire().await?;
        sqlx::query("VACUUM INTO ?1")
            .bind(to)
            .execute(&mut *conn)
            .await
            .context("VACUUM INTO failed")?;
        Ok(())
    }
}

fn connect_options(settings: &DatabaseSettings) -> anyhow::Result<SqliteConnectOptions> {
    Ok(SqliteConnectOptions::from_str(settings.url.expose_secret())
        .context("database.url is not a valid SQLite URL (sqlite://PATH)")?
        .journal_mode(SqliteJournalMode::Wal)
        // When a commit reaches the disk (see config/default.toml).
        .synchronous(match settings.sqlite_synchronous {
            crate::config::SqliteSynchronous::Full => SqliteSynchronous::Full,
            crate::config::SqliteSynchronous::Normal => SqliteSynchronous::Normal,
        })
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        // Reads through a memory map of the file (the OS page cache, shared by every
        // connection) rather than a read() per page missing from each connection's own
        // cache, which is small (2 MiB).
        .pragma("mmap_size", MMAP_SIZE.to_string())
        .log_statements(log::LevelFilter::Debug))
}

/// Creates `dir` (and its parents) if missing; a directory Tessera creates is 0700 (an
/// existing one is left as it is).
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))
}

/// Sorts sqlx errors into "retry later" (503) and everything else.
fn classify(err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation => {
            StoreError::Conflict
        }
        sqlx::Error::Database(db) => {
            // Primary result codes: 5 BUSY, 6 LOCKED (another process holds the file
            // past busy_timeout), 10 IOERR, 13 FULL, 14 CANTOPEN.
            let code: i64 = db.code().and_then(|c| c.parse().ok()).unwrap_or(0);
            if matches!(code & 0xff, 5 | 6 | 10 | 13 | 14) {
                StoreError::Unavailable(err.into())
            } else {
                StoreError::Other(err.into())
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err.into()),
        _ => StoreError::Other(err.into()),
    }
}

/// The process clock in the stored form (Unix microseconds).
fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

fn us(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn time(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn secs_us(secs: i64) -> i64 {
    secs.saturating_mul(1_000_000)
}

fn uuid(text: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(text).map_err(|e| StoreError::Other(anyhow::anyhow!("stored id: {e}")))
}

/// A stored user id, inside a writer's work.
fn user_id(text: &str) -> Result<UserId, sqlx::Error> {
    Uuid::parse_str(text)
        .map(UserId)
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn opt_uuid(text: Option<String>) -> StoreResult<Option<Uuid>> {
    text.as_deref().map(uuid).transpose()
}

fn roles_from(json: &str) -> StoreResult<Vec<String>> {
    serde_json::from_str(json).map_err(|e| StoreError::Other(anyhow::anyhow!("stored roles: {e}")))
}

fn roles_json(roles: &[String]) -> String {
    serde_json::Value::from(roles).to_string()
}

fn user_from(
    id: &str,
    email: Option<String>,
    roles: &str,
    disabled: bool,
    email_verified: bool,
    created_at: i64,
    last_login_at: Option<i64>,
) -> StoreResult<User> {
    Ok(User {
        id: UserId(uuid(id)?),
        email,
        roles: roles_from(roles)?,
        disabled,
        email_verified,
        created_at: time(created_at),
        last_login_at: last_login_at.map(time),
    })
}

fn ids(rows: Vec<String>) -> StoreResult<Vec<SessionId>> {
    rows.iter().map(|s| uuid(s).map(SessionId)).collect()
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn pool_status(&self) -> super::PoolStatus {
        super::PoolStatus::of(&self.reader)
    }

    async fn probe_acquire(&self) -> StoreResult<Duration> {
        super::probe_acquire(&self.reader).await.map_err(classify)
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn clock(&self) -> StoreResult<DateTime<Utc>> {
        Ok(Utc::now())
    }

    async fn save_mark(
        &self,
        key: &str,
        value: i64,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let key = key.to_owned();
        let existed = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let existed = sqlx::query_scalar!(
                        "SELECT 1 AS one FROM revocation_marks WHERE key = ?1",
                        key
                    )
                    .fetch_optional(&mut *conn)
                    .await?
                    .is_some();
                    let expires_at = us(expires_at);
                    sqlx::query!(
                        r#"INSERT INTO revocation_marks (key, value, expires_at) VALUES (?1, ?2, ?3)
                       ON CONFLICT (key) DO UPDATE
                         SET value = max(value, excluded.value),
                             expires_at = max(expires_at, excluded.expires_at)"#,
                        key,
                        value,
                        expires_at,
                    )
                    .execute(&mut *conn)
                    .await?;
                    Ok(existed)
                })
            }))
            .await?;
        Ok(!existed)
    }

    async fn live_marks(&self, session_mark_secs: i64) -> StoreResult<Vec<SavedMark>> {
        let now = now_us();
        let saved = sqlx::query!(
            "SELECT key, value, expires_at FROM revocation_marks WHERE expires_at > ?1",
            now,
        )
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        let ended = sqlx::query!(
            r#"SELECT id, revoked_at AS "revoked_at!" FROM sessions
               WHERE revoked_at > ?1"#,
            now - secs_us(session_mark_secs),
        )
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        let mut marks: Vec<SavedMark> = saved
            .into_iter()
            .map(|r| SavedMark {
                key: r.key,
                value: r.value,
                expires_at: time(r.expires_at),
            })
            .collect();
        for r in ended {
            marks.push(SavedMark {
                key: format!("revoked:sid:{}", uuid(&r.id)?),
                value: 1,
                expires_at: time(r.revoked_at + secs_us(session_mark_secs)),
            });
        }
        Ok(marks)
    }

    async fn delete_expired_marks(&self, batch: i64) -> StoreResult<u64> {
        let now = now_us();
        self.write_one(sqlx::query!(
            r#"DELETE FROM revocation_marks WHERE key IN (
                   SELECT key FROM revocation_marks WHERE expires_at < ?1 LIMIT ?2
               )"#,
            now,
            batch,
        ))
        .await
    }

    async fn claim_single_instance(&self) -> StoreResult<bool> {
        let mut claim = self.claim.lock().expect("claim lock");
        if claim.is_some() {
            return Ok(true);
        }
        let path = lock_file(&self.file);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| {
                StoreError::Other(anyhow::anyhow!("cannot open {}: {e}", path.display()))
            })?;
        // An advisory lock held while the file is open: the OS lets go of it when the
        // process ends, however it ends.
        match file.try_lock() {
            Ok(()) => {
                *claim = Some(file);
                Ok(true)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Other(anyhow::anyhow!(
                "cannot lock {}: {e}",
                path.display()
            ))),
        }
    }

    async fn create_user(
        &self,
        email: &Email,
        password_hash: &str,
        roles: &[String],
        verification: Option<EmailTokenGrant<'_>>,
    ) -> StoreResult<User> {
        let id = Uuid::new_v4().to_string();
        let verification = verification.map(OwnedGrant::from);
        let normalized = email.normalized();
        let roles = roles_json(roles);
        let (email, password_hash) = (email.as_str().to_owned(), password_hash.to_owned());
        // A taken email is no error here (it would roll back the writes that share its
        // transaction): nothing is inserted, and nothing returned.
        let row = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let row = sqlx::query!(
                        r#"INSERT INTO users (id, email, email_normalized, password_hash,
                                              roles, created_at, updated_at)
                           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
                           ON CONFLICT (email_normalized) DO NOTHING
                           RETURNING id, email, roles, disabled, email_verified, created_at, last_login_at"#,
                        id,
                        email,
                        normalized,
                        password_hash,
                        roles,
                        now,
                    )
                    .fetch_optional(&mut *conn)
                    .await?;
                    if let (Some(row), Some(grant)) = (&row, &verification) {
                        insert_email_token(conn, &row.id, grant, now).await?;
                    }
                    Ok(row)
                })
            }))
            .await?
            .ok_or(StoreError::Conflict)?;
        user_from(
            &row.id,
            row.email,
            &row.roles,
            row.disabled,
            row.email_verified,
            row.created_at,
            row.last_login_at,
        )
    }

    async fn create_anonymous(&self, password_hash: &str) -> StoreResult<User> {
        let id = Uuid::new_v4().to_string();
        let roles = roles_json(&[ANONYMOUS_ROLE.to_owned()]);
        let password_hash = password_hash.to_owned();
        let row = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let row = sqlx::query!(
                        r#"INSERT INTO users (id, password_hash, roles, created_at, updated_at)
                           VALUES (?1, ?2, ?3, ?4, ?4)
                           RETURNING id, email, roles, disabled, email_verified, created_at,
                                     last_login_at"#,
                        id,
                        password_hash,
                        roles,
                        now,
                    )
                    .fetch_one(&mut *conn)
                    .await?;
                    Ok(row)
                })
            }))
            .await?;
        user_from(
            &row.id,
            row.email,
            &row.roles,
            row.disabled,
            row.email_verified,
            row.created_at,
            row.last_login_at,
        )
    }

    async fn convert_anonymous(
        &self,
        user: UserId,
        email: &Email,
        password_hash: &str,
        roles: &[String],
        verification: Option<EmailTokenGrant<'_>>,
    ) -> StoreResult<Option<User>> {
        let id = user.0.to_string();
        let verification = verification.map(OwnedGrant::from);
        let normalized = email.normalized();
        let roles = roles_json(roles);
        let (email, password_hash) = (email.as_str().to_owned(), password_hash.to_owned());
        let row = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    // A taken email fails the statement (unique index): the writer rolls
                    // the transaction back and the error reads as a conflict.
                    let row = sqlx::query!(
                        r#"UPDATE users SET email = ?2, email_normalized = ?3, password_hash = ?4,
                                            roles = ?5, updated_at = ?6
                           WHERE id = ?1 AND email IS NULL AND NOT disabled
                           RETURNING id, email, roles, disabled, email_verified, created_at,
                                     last_login_at"#,
                        id,
                        email,
                        normalized,
                        password_hash,
                        roles,
                        now,
                    )
                    .fetch_optional(&mut *conn)
                    .await?;
                    if let (Some(row), Some(grant)) = (&row, &verification) {
                        insert_email_token(conn, &row.id, grant, now).await?;
                    }
                    Ok(row)
                })
            }))
            .await?;
        row.map(|row| {
            user_from(
                &row.id,
                row.email,
                &row.roles,
                row.disabled,
                row.email_verified,
                row.created_at,
                row.last_login_at,
            )
        })
        .transpose()
    }

    async fn idle_anonymous_users(
        &self,
        retention_secs: i64,
        batch: i64,
    ) -> StoreResult<Vec<UserId>> {
        let since = now_us() - secs_us(retention_secs);
        let ids = sqlx::query_scalar!(
            r#"SELECT id FROM users u
               WHERE email IS NULL AND created_at < ?1
                 AND NOT EXISTS (SELECT 1 FROM sessions s
                                 WHERE s.user_id = u.id AND s.last_used_at > ?1)
               ORDER BY created_at
               LIMIT ?2"#,
            since,
            batch,
        )
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        ids.iter().map(|id| uuid(id).map(UserId)).collect()
    }

    async fn find_credentials(
        &self,
        email: &Email,
        device: Option<&[u8]>,
    ) -> StoreResult<Option<Credentials>> {
        let normalized = email.normalized();
        let now = now_us();
        let row = sqlx::query!(
            r#"SELECT u.id, u.email, u.roles, u.disabled, u.email_verified, u.created_at, u.last_login_at,
                      u.password_hash,
                      EXISTS (SELECT 1 FROM devices d
                              WHERE d.token_hash = ?2 AND d.user_id = u.id
                                AND d.expires_at > ?3) AS "device_known!: bool"
               FROM users u WHERE u.email_normalized = ?1"#,
            normalized,
            device,
            now,
        )
        .fetch_optional(&self.reader)
        .await
        .map_err(classify)?;
        row.map(|r| {
            Ok(Credentials {
                user: user_from(
                    &r.id,
                    r.email,
                    &r.roles,
                    r.disabled,
                    r.email_verified,
                    r.created_at,
                    r.last_login_at,
                )?,
                password_hash: r.password_hash,
                device_known: r.device_known,
            })
        })
        .transpose()
    }

    async fn find_user(&self, id: UserId) -> StoreResult<Option<User>> {
        let id = id.0.to_string();
        let row = sqlx::query!(
            r#"SELECT id, email, roles, disabled, email_verified, created_at, last_login_at
               FROM users WHERE id = ?1"#,
            id,
        )
        .fetch_optional(&self.reader)
        .await
        .map_err(classify)?;
        row.map(|r| {
            user_from(
                &r.id,
                r.email,
                &r.roles,
                r.disabled,
                r.email_verified,
                r.created_at,
                r.last_login_at,
            )
        })
        .transpose()
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
                 AND (?1 IS NULL
                      OR (email_normalized >= ?1
                          AND substr(email_normalized, 1, length(?1)) = ?1))
                 AND (?2 IS NULL OR email_normalized > ?2)
               ORDER BY email_normalized
               LIMIT ?3"#,
            prefix,
            after,
            limit,
        )
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        rows.into_iter()
            .map(|r| {
                user_from(
                    &r.id,
                    r.email,
                    &r.roles,
                    r.disabled,
                    r.email_verified,
                    r.created_at,
                    r.last_login_at,
                )
            })
            .collect()
    }

    async fn replace_password_hash(&self, user: UserId, old: &str, new: &str) -> StoreResult<()> {
        let user = user.0.to_string();
        let now = now_us();
        self.write_one(sqlx::query!(
            r#"UPDATE users SET password_hash = ?3, updated_at = ?4
               WHERE id = ?1 AND password_hash = ?2"#,
            user,
            old,
            new,
            now,
        ))
        .await?;
        Ok(())
    }

    async fn create_session(&self, new: NewSession<'_>) -> StoreResult<Option<CreatedSession>> {
        // The writer lock orders this login against a password change, disable or role
        // change: either it ran first (and this sees it) or it runs after and ends this
        // session or marks its token.
        let user = new.user_id.0.to_string();
        let session = new.id.0.to_string();
        let password_hash = new.password_hash.to_owned();
        let (ip, user_agent) = (new.client.ip.clone(), new.client.user_agent.clone());
        let (refresh_hash, chain_hash, device_hash) = (
            new.refresh_hash.to_vec(),
            new.chain_hash.to_vec(),
            new.device_hash.to_vec(),
        );
        let (recent_secs, max_per_user, remember_me, expires_at) = (
            new.recent_secs,
            new.max_per_user,
            new.remember_me,
            us(new.expires_at),
        );
        let device_ttl_secs = new.device_ttl_secs;
        let notice = new.notice.map(<[u8]>::to_vec);
        let amr = roles_json(new.amr);
        let amr_granted = new.amr.to_vec();
        let Some((roles, email_verified, mut evicted, now)) = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                let now = now_us();
                let Some(granted) = sqlx::query!(
                    r#"UPDATE users SET last_login_at = ?3
                       WHERE id = ?1 AND password_hash = ?2 AND NOT disabled
                       RETURNING roles, email_verified"#,
                    user,
                    password_hash,
                    now,
                )
                .fetch_optional(&mut *conn)
                .await
                ?
                else {
                    return Ok(None);
                };
                // Sessions the cap ended recently, then the least recently used live ones past
                // the cap (cap - 1 others are kept beside the new one).
                let recent = now - secs_us(recent_secs);
                let mut evicted = sqlx::query_scalar!(
                    r#"SELECT id FROM sessions
                       WHERE user_id = ?1 AND revoked_reason = 'session_cap' AND revoked_at > ?2"#,
                    user,
                    recent,
                )
                .fetch_all(&mut *conn)
                .await
                ?;
                if max_per_user > 0 {
                    let keep = i64::from(max_per_user) - 1;
                    let ended = sqlx::query_scalar!(
                        r#"UPDATE sessions SET revoked_at = ?2, revoked_reason = 'session_cap'
                           WHERE id IN (
                               SELECT id FROM sessions
                               WHERE user_id = ?1 AND revoked_at IS NULL AND expires_at > ?2
                               ORDER BY last_used_at DESC
                               LIMIT -1 OFFSET ?3
                           )
                           RETURNING id"#,
                        user,
                        now,
                        keep,
                    )
                    .fetch_all(&mut *conn)
                    .await
                    ?;
                    evicted.extend(ended);
                }
                sqlx::query!(
                    r#"INSERT INTO sessions (id, user_id, remember_me, created_at, last_used_at,
                                             expires_at, login_ip, login_user_agent, last_ip,
                                             last_user_agent, chain_hash, auth_time, amr)
                       VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6, ?7, ?6, ?7, ?8, ?4, ?9)"#,
                    session,
                    user,
                    remember_me,
                    now,
                    expires_at,
                    ip,
                    user_agent,
                    chain_hash,
                    amr,
                )
                .execute(&mut *conn)
                .await
                ?;
                sqlx::query!(
                    "INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES (?1, ?2, ?3)",
                    refresh_hash,
                    session,
                    now,
                )
                .execute(&mut *conn)
                .await
                ?;
                // A device token is only ever renewed for the user it belongs to.
                let device_expires = now + secs_us(device_ttl_secs);
                sqlx::query!(
                    r#"INSERT INTO devices (token_hash, user_id, created_at, last_used_at, expires_at)
                       VALUES (?1, ?2, ?3, ?3, ?4)
                       ON CONFLICT (token_hash) DO UPDATE
                           SET last_used_at = excluded.last_used_at, expires_at = excluded.expires_at
                           WHERE devices.user_id = excluded.user_id"#,
                    device_hash,
                    user,
                    now,
                    device_expires,
                )
                .execute(&mut *conn)
                .await
                ?;
                if let Some(notice) = &notice {
                    enqueue(conn, &user, notice, now).await?;
                }
                Ok(Some((granted.roles, granted.email_verified, evicted, now)))
                })
            }))
            .await?
        else {
            return Ok(None);
        };
        evicted.sort();
        evicted.dedup();
        Ok(Some(CreatedSession {
            grant: Grant {
                session_id: new.id,
                user_id: new.user_id,
                roles: roles_from(&roles)?,
                email_verified,
                amr: amr_granted,
                auth_time: time(now),
                expires_at: new.expires_at,
                remember_me: new.remember_me,
                issued_at: time(now),
            },
            evicted: ids(evicted)?,
        }))
    }

    async fn rotate_refresh(&self, r: Rotation<'_>) -> StoreResult<Option<Grant>> {
        // The writer lock is the race arbiter: of two requests presenting the same
        // token, the second runs after the first committed, finds it rotated, and falls
        // back to `refresh_state`. `rotated_at` is the clock once the lock is held.
        //
        // One command to the connection's thread for all of it (each statement sent on
        // its own costs a round trip to that thread, most of a rotation's time), so the
        // statements go together, each taking its next `?` parameters in order. The
        // first marks the token rotated only if it and its session are live; the others
        // act only where it did (the successor's hash, fresh and random, names this
        // rotation); the last returns the grant, or nothing.
        let (token, successor) = (r.token_hash.to_vec(), r.successor_hash.to_vec());
        let sealed = r.successor_sealed.to_vec();
        let (ip, user_agent) = (r.client.ip.clone(), r.client.user_agent.clone());
        let (idle_ttl_secs, grace_secs, audit) = (r.idle_ttl_secs, r.grace_secs, r.audit);
        let (bind, bound_agent) = (r.bind_user_agent, r.client.user_agent.clone());
        let (idle_by_role, absolute_by_role) =
            (r.idle_by_role.to_owned(), r.absolute_by_role.to_owned());
        let request_id = r.client.request_id.clone();
        let (row, now) = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let grace_since = now - secs_us(grace_secs);
                    let kind = AuditKind::Refresh.as_str();
                    let row = sqlx::query!(
                        r#"UPDATE refresh_tokens
                       SET rotated_at = ?, successor_hash = ?, successor_sealed = ?
                       WHERE token_hash = ? AND rotated_at IS NULL
                         AND EXISTS (SELECT 1 FROM sessions s JOIN users u ON u.id = s.user_id
                                     WHERE s.id = refresh_tokens.session_id
                                       AND s.revoked_at IS NULL AND s.expires_at > ?
                                       AND s.last_used_at > ? - coalesce(
                                           (SELECT min(p.value) FROM json_each(?) p
                                            JOIN json_each(u.roles) j ON p.key = j.value),
                                           ?) * 1000000
                                       AND NOT EXISTS (
                                           SELECT 1 FROM json_each(?) p
                                           JOIN json_each(u.roles) j ON p.key = j.value
                                           WHERE s.created_at <= ? - p.value * 1000000)
                                       AND NOT u.disabled
                                       AND (NOT ? OR s.login_user_agent IS ?));
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
                       INSERT INTO audit_events (occurred_at, kind, user_id, session_id, ip,
                                                 user_agent, request_id)
                       SELECT ?, ?, s.user_id, s.id, ?, ?, ?
                       FROM refresh_tokens rt JOIN sessions s ON s.id = rt.session_id
                       WHERE ? AND rt.token_hash = ? AND rt.successor_hash = ?;
                       SELECT rt.session_id, s.user_id, s.expires_at, s.remember_me, u.roles,
                              u.email_verified,
                              coalesce(s.auth_time, s.created_at) AS "auth_time!: i64",
                              coalesce(s.amr, '["pwd"]') AS "amr!: String"
                       FROM refresh_tokens rt
                       JOIN sessions s ON s.id = rt.session_id
                       JOIN users u ON u.id = s.user_id
                       WHERE rt.token_hash = ? AND rt.successor_hash = ?"#,
                        // the rotation
                        now,
                        &successor,
                        sealed,
                        &token,
                        now,
                        now,
                        idle_by_role,
                        idle_ttl_secs,
                        absolute_by_role,
                        now,
                        bind,
                        bound_agent,
                        // the session's use
                        now,
                        ip,
                        user_agent,
                        &token,
                        &successor,
                        // the successor
                        &successor,
                        now,
                        &token,
                        &successor,
                        // the pruning
                        &token,
                        &successor,
                        &token,
                        grace_since,
                        // the audit row
                        now,
                        kind,
                        ip,
                        user_agent,
                        request_id,
                        audit,
                        &token,
                        &successor,
                        // the grant
                        &token,
                        &successor,
                    )
                    .fetch_optional(&mut *conn)
                    .await?;
                    Ok((row, now))
                })
            }))
            .await?;
        row.map(|row| {
            Ok(Grant {
                session_id: SessionId(uuid(&row.session_id)?),
                user_id: UserId(uuid(&row.user_id)?),
                roles: roles_from(&row.roles)?,
                email_verified: row.email_verified,
                amr: roles_from(&row.amr)?,
                auth_time: time(row.auth_time),
                expires_at: time(row.expires_at),
                remember_me: row.remember_me,
                issued_at: time(now),
            })
        })
        .transpose()
    }

    async fn reauthenticate_session(&self, r: Reauthentication<'_>) -> StoreResult<Option<Grant>> {
        let (session, user) = (r.session.0.to_string(), r.user.0.to_string());
        let amr = roles_json(r.amr);
        let (refresh_hash, chain_hash) = (r.refresh_hash.to_vec(), r.chain_hash.to_vec());
        let row = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let Some(kept) = sqlx::query!(
                        r#"UPDATE sessions
                           SET auth_time = ?3, amr = ?4, chain_hash = ?5, generation = 0,
                               last_used_at = ?3
                           WHERE id = ?1 AND user_id = ?2 AND revoked_at IS NULL
                             AND expires_at > ?3
                             AND EXISTS (SELECT 1 FROM users WHERE id = ?2 AND NOT disabled)
                           RETURNING expires_at, remember_me"#,
                        session,
                        user,
                        now,
                        amr,
                        chain_hash,
                    )
                    .fetch_optional(&mut *conn)
                    .await?
                    else {
                        return Ok(None);
                    };
                    sqlx::query!("DELETE FROM refresh_tokens WHERE session_id = ?1", session)
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query!(
                        r#"INSERT INTO refresh_tokens (token_hash, session_id, created_at)
                           VALUES (?1, ?2, ?3)"#,
                        refresh_hash,
                        session,
                        now,
                    )
                    .execute(&mut *conn)
                    .await?;
                    let user = sqlx::query!(
                        "SELECT roles, email_verified FROM users WHERE id = ?1",
                        user
                    )
                    .fetch_one(&mut *conn)
                    .await?;
                    Ok(Some((kept, user, amr, now)))
                })
            }))
            .await?;
        row.map(|(kept, user, amr, now)| {
            Ok(Grant {
                session_id: r.session,
                user_id: r.user,
                roles: roles_from(&user.roles)?,
                email_verified: user.email_verified,
                amr: roles_from(&amr)?,
                auth_time: time(now),
                expires_at: time(kept.expires_at),
                remember_me: kept.remember_me,
                issued_at: time(now),
            })
        })
        .transpose()
    }

    async fn refresh_state(&self, token_hash: &[u8]) -> StoreResult<Option<RefreshState>> {
        let row = sqlx::query!(
            r#"SELECT rt.session_id, rt.rotated_at, rt.successor_sealed,
                      s.user_id, s.expires_at, s.last_used_at, s.revoked_at,
                      s.remember_me, u.roles, u.email_verified, u.disabled, s.login_user_agent,
                      s.created_at,
                      coalesce(s.auth_time, s.created_at) AS "auth_time!: i64",
                      coalesce(s.amr, '["pwd"]') AS "amr!: String"
               FROM refresh_tokens rt
               JOIN sessions s ON s.id = rt.session_id
               JOIN users u ON u.id = s.user_id
               WHERE rt.token_hash = ?1"#,
            token_hash,
        )
        .fetch_optional(&self.reader)
        .await
        .map_err(classify)?;
        let now = Utc::now();
        row.map(|r| {
            Ok(RefreshState {
                grant: Grant {
                    session_id: SessionId(uuid(&r.session_id)?),
                    user_id: UserId(uuid(&r.user_id)?),
                    roles: roles_from(&r.roles)?,
                    email_verified: r.email_verified,
                    amr: roles_from(&r.amr)?,
                    auth_time: time(r.auth_time),
                    expires_at: time(r.expires_at),
                    remember_me: r.remember_me,
                    issued_at: now,
                },
                rotated_at: r.rotated_at.map(time),
                successor_sealed: r.successor_sealed,
                last_used_at: time(r.last_used_at),
                revoked_at: r.revoked_at.map(time),
                disabled: r.disabled,
                now,
                login_user_agent: r.login_user_agent,
                created_at: time(r.created_at),
            })
        })
        .transpose()
    }

    async fn chain_state(
        &self,
        session: SessionId,
        secret_hash: &[u8],
    ) -> StoreResult<Option<(RefreshState, i64)>> {
        let session = session.0.to_string();
        let row = sqlx::query!(
            r#"SELECT s.id, s.user_id, s.expires_at, s.last_used_at, s.revoked_at,
                      s.generation, s.remember_me, u.roles, u.email_verified, u.disabled,
                      s.login_user_agent, s.created_at,
                      coalesce(s.auth_time, s.created_at) AS "auth_time!: i64",
                      coalesce(s.amr, '["pwd"]') AS "amr!: String"
               FROM sessions s JOIN users u ON u.id = s.user_id
               WHERE s.id = ?1 AND s.chain_hash = ?2"#,
            session,
            secret_hash,
        )
        .fetch_optional(&self.reader)
        .await
        .map_err(classify)?;
        let now = Utc::now();
        row.map(|r| {
            let state = RefreshState {
                grant: Grant {
                    session_id: SessionId(uuid(&r.id)?),
                    user_id: UserId(uuid(&r.user_id)?),
                    roles: roles_from(&r.roles)?,
                    email_verified: r.email_verified,
                    amr: roles_from(&r.amr)?,
                    auth_time: time(r.auth_time),
                    expires_at: time(r.expires_at),
                    remember_me: r.remember_me,
                    issued_at: now,
                },
                rotated_at: None,
                successor_sealed: None,
                last_used_at: time(r.last_used_at),
                revoked_at: r.revoked_at.map(time),
                disabled: r.disabled,
                now,
                login_user_agent: r.login_user_agent,
                created_at: time(r.created_at),
            };
            Ok((state, r.generation))
        })
        .transpose()
    }

    async fn revoke_session(
        &self,
        id: SessionId,
        reason: &str,
        notice: Option<NoticeFor>,
    ) -> StoreResult<Option<UserId>> {
        let id = id.0.to_string();
        let reason = reason.to_owned();
        let user = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let ended = sqlx::query!(
                        r#"UPDATE sessions SET revoked_at = ?2, revoked_reason = ?3
                       WHERE id = ?1 AND revoked_at IS NULL
                       RETURNING user_id,
                                 (SELECT email FROM users
                                  WHERE users.id = sessions.user_id) AS "email!: String""#,
                        id,
                        now,
                        reason,
                    )
                    .fetch_optional(&mut *conn)
                    .await?;
                    if let (Some(ended), Some(notice)) = (&ended, notice) {
                        let sealed = notice(user_id(&ended.user_id)?, &ended.email);
                        enqueue(conn, &ended.user_id, &sealed, now).await?;
                    }
                    Ok(ended.map(|e| e.user_id))
                })
            }))
            .await?;
        Ok(opt_uuid(user)?.map(UserId))
    }

    async fn revoke_user_sessions(
        &self,
        user: UserId,
        except: Option<SessionId>,
        reason: &str,
        recent_secs: i64,
    ) -> StoreResult<Vec<SessionId>> {
        let user = user.0.to_string();
        let except = except.map(|s| s.0.to_string());
        let reason = reason.to_owned();
        let (mut ended, now_ended) = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let recent = now - secs_us(recent_secs);
                    // Those ended earlier, within the window, then those ended now.
                    let ended = sqlx::query_scalar!(
                        r#"SELECT id FROM sessions
                       WHERE user_id = ?1 AND (?2 IS NULL OR id <> ?2) AND revoked_at > ?3"#,
                        user,
                        except,
                        recent,
                    )
                    .fetch_all(&mut *conn)
                    .await?;
                    let now_ended = sqlx::query_scalar!(
                        r#"UPDATE sessions SET revoked_at = ?3, revoked_reason = ?4
                       WHERE user_id = ?1 AND revoked_at IS NULL AND (?2 IS NULL OR id <> ?2)
                       RETURNING id"#,
                        user,
                        except,
                        now,
                        reason,
                    )
                    .fetch_all(&mut *conn)
                    .await?;
                    Ok((ended, now_ended))
                })
            }))
            .await?;
        ended.extend(now_ended);
        ids(ended)
    }

    async fn list_sessions(
        &self,
        user: UserId,
        idle_ttl_secs: i64,
    ) -> StoreResult<Vec<SessionInfo>> {
        let user = user.0.to_string();
        let now = now_us();
        let idle = secs_us(idle_ttl_secs);
        let rows = sqlx::query!(
            r#"SELECT id, remember_me, created_at, last_used_at,
                      min(expires_at, last_used_at + ?3) AS "expires_at!: i64",
                      login_ip, login_user_agent, last_ip, last_user_agent
               FROM sessions
               WHERE user_id = ?1 AND revoked_at IS NULL AND expires_at > ?2
                 AND last_used_at > ?2 - ?3
               ORDER BY last_used_at DESC
               LIMIT 1000"#,
            user,
            now,
            idle,
        )
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        rows.into_iter()
            .map(|r| {
                Ok(SessionInfo {
                    id: SessionId(uuid(&r.id)?),
                    remember_me: r.remember_me,
                    created_at: time(r.created_at),
                    last_used_at: time(r.last_used_at),
                    expires_at: time(r.expires_at),
                    login_ip: r.login_ip,
                    login_user_agent: r.login_user_agent,
                    last_ip: r.last_ip,
                    last_user_agent: r.last_user_agent,
                })
            })
            .collect()
    }

    async fn revoke_own_session(
        &self,
        user: UserId,
        id: SessionId,
        reason: &str,
        recent_secs: i64,
    ) -> StoreResult<bool> {
        let user = user.0.to_string();
        let id = id.0.to_string();
        let reason = reason.to_owned();
        let (recently_ended, ended) = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                let now = now_us();
                let recent = now - secs_us(recent_secs);
                let recently_ended = sqlx::query_scalar!(
                    "SELECT 1 AS one FROM sessions WHERE id = ?1 AND user_id = ?2 AND revoked_at > ?3",
                    id,
                    user,
                    recent,
                )
                .fetch_optional(&mut *conn)
                .await
                ?
                .is_some();
                let ended = sqlx::query!(
                    r#"UPDATE sessions SET revoked_at = ?3, revoked_reason = ?4
                       WHERE id = ?1 AND user_id = ?2 AND revoked_at IS NULL"#,
                    id,
                    user,
                    now,
                    reason,
                )
                .execute(&mut *conn)
                .await
                ?
                .rows_affected();
                Ok((recently_ended, ended))
                })
            }))
            .await?;
        Ok(recently_ended || ended > 0)
    }

    async fn change_password(
        &self,
        user: UserId,
        old: &str,
        new: &str,
        keep: SessionId,
        notice: Option<&[u8]>,
    ) -> StoreResult<Option<Vec<SessionId>>> {
        let user = user.0.to_string();
        let keep = keep.0.to_string();
        let notice = notice.map(<[u8]>::to_vec);
        let (old, new) = (old.to_owned(), new.to_owned());
        let Some(ended) = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let changed = sqlx::query!(
                        r#"UPDATE users SET password_hash = ?3, updated_at = ?4
                       WHERE id = ?1 AND password_hash = ?2 AND NOT disabled"#,
                        user,
                        old,
                        new,
                        now,
                    )
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    if changed == 0 {
                        return Ok(None);
                    }
                    let ended = sqlx::query_scalar!(
                        r#"UPDATE sessions SET revoked_at = ?3, revoked_reason = 'password_changed'
                       WHERE user_id = ?1 AND revoked_at IS NULL AND id <> ?2
                       RETURNING id"#,
                        user,
                        keep,
                        now,
                    )
                    .fetch_all(&mut *conn)
                    .await?;
                    if let Some(notice) = &notice {
                        enqueue(conn, &user, notice, now).await?;
                    }
                    Ok(Some(ended))
                })
            }))
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(ids(ended)?))
    }

    async fn update_user(
        &self,
        user: UserId,
        change: &UserChange,
    ) -> StoreResult<Option<UserUpdate>> {
        let id = user.0.to_string();
        let roles = change.roles.as_deref().map(roles_json);
        let disabled = change.disabled;
        let demotes = change.disabled == Some(true)
            || change
                .roles
                .as_ref()
                .is_some_and(|r| !r.iter().any(|r| r == crate::domain::ADMIN_ROLE));
        let Some(done) = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let Some(old_roles) =
                        sqlx::query_scalar!("SELECT roles FROM users WHERE id = ?1", id)
                            .fetch_optional(&mut *conn)
                            .await?
                    else {
                        return Ok(None);
                    };
                    if demotes && last_admin(conn, &id).await? {
                        return Ok(Some(Err(StoreError::LastAdmin)));
                    }
                    let row = sqlx::query!(
                        r#"UPDATE users
                       SET disabled = coalesce(?2, disabled), roles = coalesce(?3, roles),
                           updated_at = ?4
                       WHERE id = ?1
                       RETURNING id AS "id!", email AS "email?", roles AS "roles!",
                                 disabled AS "disabled!: bool",
                                 email_verified AS "email_verified!: bool",
                                 created_at AS "created_at!", last_login_at"#,
                        id,
                        disabled,
                        roles,
                        now,
                    )
                    .fetch_one(&mut *conn)
                    .await?;
                    let ended = if row.disabled {
                        sqlx::query_scalar!(
                            r#"UPDATE sessions SET revoked_at = ?2, revoked_reason = 'user_disabled'
                           WHERE user_id = ?1 AND revoked_at IS NULL
                           RETURNING id"#,
                            id,
                            now,
                        )
                        .fetch_all(&mut *conn)
                        .await?
                    } else {
                        Vec::new()
                    };
                    Ok(Some(Ok((old_roles, row, ended))))
                })
            }))
            .await?
        else {
            return Ok(None);
        };
        let (old_roles, row, ended) = done?;
        let user = user_from(
            &row.id,
            row.email,
            &row.roles,
            row.disabled,
            row.email_verified,
            row.created_at,
            row.last_login_at,
        )?;
        let roles_changed = super::roles_differ(&roles_from(&old_roles)?, &user.roles);
        Ok(Some(UserUpdate {
            user,
            roles_changed,
            ended: ids(ended)?,
        }))
    }

    async fn issue_email_token(
        &self,
        user: UserId,
        grant: EmailTokenGrant<'_>,
    ) -> StoreResult<bool> {
        let user = user.0.to_string();
        let grant = OwnedGrant::from(grant);
        self.writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let exists = sqlx::query_scalar!("SELECT 1 FROM users WHERE id = ?1", user)
                        .fetch_optional(&mut *conn)
                        .await?
                        .is_some();
                    if !exists {
                        return Ok(false);
                    }
                    sqlx::query!(
                        r#"DELETE FROM email_tokens
                           WHERE user_id = ?1 AND kind = ?2 AND used_at IS NULL"#,
                        user,
                        grant.kind,
                    )
                    .execute(&mut *conn)
                    .await?;
                    insert_email_token(conn, &user, &grant, now).await?;
                    Ok(true)
                })
            }))
            .await
    }

    async fn verify_email(&self, token_hash: &[u8]) -> StoreResult<Result<UserId, TokenRefusal>> {
        let hash = token_hash.to_vec();
        let used = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let Some(user) = sqlx::query_scalar!(
                        r#"UPDATE email_tokens SET used_at = ?2
                           WHERE token_hash = ?1 AND kind = 'verify_email' AND used_at IS NULL
                             AND expires_at > ?2
                           RETURNING user_id"#,
                        hash,
                        now,
                    )
                    .fetch_optional(&mut *conn)
                    .await?
                    else {
                        return Ok(Err(token_refusal(conn, &hash, "verify_email", now).await?));
                    };
                    sqlx::query!(
                        "UPDATE users SET email_verified = TRUE, updated_at = ?2 WHERE id = ?1",
                        user,
                        now,
                    )
                    .execute(&mut *conn)
                    .await?;
                    Ok(Ok(user))
                })
            }))
            .await?;
        Ok(match used {
            Ok(user) => Ok(UserId(uuid(&user)?)),
            Err(refused) => Err(refused),
        })
    }

    async fn confirm_email_change(
        &self,
        token_hash: &[u8],
    ) -> StoreResult<Result<User, TokenRefusal>> {
        let hash = token_hash.to_vec();
        // The writer's work must not fail in normal operation (its batch would roll
        // back with it), so a taken address is found first and answered as a value.
        let done = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let Some(token) = sqlx::query!(
                        r#"SELECT user_id, new_email AS "new_email!", new_email_normalized AS "norm!"
                           FROM email_tokens
                           WHERE token_hash = ?1 AND kind = 'confirm_email_change'
                             AND used_at IS NULL AND expires_at > ?2"#,
                        hash,
                        now,
                    )
                    .fetch_optional(&mut *conn)
                    .await?
                    else {
                        let why = token_refusal(conn, &hash, "confirm_email_change", now).await?;
                        return Ok(Err(Some(why)));
                    };
                    let taken = sqlx::query_scalar!(
                        "SELECT 1 FROM users WHERE email_normalized = ?1 AND id <> ?2",
                        token.norm,
                        token.user_id,
                    )
                    .fetch_optional(&mut *conn)
                    .await?
                    .is_some();
                    if taken {
                        return Ok(Err(None));
                    }
                    sqlx::query!(
                        "UPDATE email_tokens SET used_at = ?2 WHERE token_hash = ?1",
                        hash,
                        now,
                    )
                    .execute(&mut *conn)
                    .await?;
                    let row = sqlx::query!(
                        r#"UPDATE users SET email = ?2, email_normalized = ?3,
                                            email_verified = TRUE, updated_at = ?4
                           WHERE id = ?1
                           RETURNING id AS "id!", email AS "email!", roles AS "roles!",
                                     disabled AS "disabled!: bool",
                                     email_verified AS "email_verified!: bool",
                                     created_at AS "created_at!", last_login_at"#,
                        token.user_id,
                        token.new_email,
                        token.norm,
                        now,
                    )
                    .fetch_one(&mut *conn)
                    .await?;
                    Ok(Ok(row))
                })
            }))
            .await?;
        match done {
            Ok(row) => Ok(Ok(user_from(
                &row.id,
                Some(row.email),
                &row.roles,
                row.disabled,
                row.email_verified,
                row.created_at,
                row.last_login_at,
            )?)),
            Err(Some(why)) => Ok(Err(why)),
            Err(None) => Err(StoreError::Conflict),
        }
    }

    async fn email_taken(&self, email: &Email, except: UserId) -> StoreResult<bool> {
        let (norm, except) = (email.normalized(), except.0.to_string());
        Ok(sqlx::query_scalar!(
            "SELECT 1 FROM users WHERE email_normalized = ?1 AND id <> ?2",
            norm,
            except,
        )
        .fetch_optional(&self.reader)
        .await
        .map_err(classify)?
        .is_some())
    }

    async fn reset_password(
        &self,
        token_hash: &[u8],
        new_hash: &str,
        notice: Option<NoticeFor>,
    ) -> StoreResult<Result<PasswordReset, TokenRefusal>> {
        let (hash, new_hash) = (token_hash.to_vec(), new_hash.to_owned());
        let done = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let Some(user) = sqlx::query_scalar!(
                        r#"UPDATE email_tokens SET used_at = ?2
                           WHERE token_hash = ?1 AND kind = 'reset_password' AND used_at IS NULL
                             AND expires_at > ?2
                           RETURNING user_id"#,
                        hash,
                        now,
                    )
                    .fetch_optional(&mut *conn)
                    .await?
                    else {
                        return Ok(Err(token_refusal(conn, &hash, "reset_password", now).await?));
                    };
                    let changed = sqlx::query!(
                        r#"UPDATE users SET password_hash = ?2, email_verified = TRUE,
                                            updated_at = ?3
                           WHERE id = ?1 RETURNING email, email_normalized"#,
                        user,
                        new_hash,
                        now,
                    )
                    .fetch_one(&mut *conn)
                    .await?;
                    if let (Some(notice), Some(to)) = (notice, &changed.email) {
                        let sealed = notice(user_id(&user)?, to);
                        enqueue(conn, &user, &sealed, now).await?;
                    }
                    // A reset token is only ever issued to a user with an email.
                    let email_normalized = changed.email_normalized.unwrap_or_default();
                    let ended = sqlx::query_scalar!(
                        r#"UPDATE sessions SET revoked_at = ?2, revoked_reason = 'password_reset'
                           WHERE user_id = ?1 AND revoked_at IS NULL
                           RETURNING id"#,
                        user,
                        now,
                    )
                    .fetch_all(&mut *conn)
                    .await?;
                    Ok(Ok((user, email_normalized, ended)))
                })
            }))
            .await?;
        Ok(match done {
            Ok((user, email_normalized, ended)) => Ok(PasswordReset {
                user: UserId(uuid(&user)?),
                email_normalized,
                ended: ids(ended)?,
            }),
            Err(refused) => Err(refused),
        })
    }

    async fn delete_user(&self, user: UserId) -> StoreResult<bool> {
        let id = user.0.to_string();
        self.writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    if last_admin(conn, &id).await? {
                        return Ok(Err(StoreError::LastAdmin));
                    }
                    Ok(Ok(delete_user_rows(conn, &id).await?))
                })
            }))
            .await?
    }

    async fn totp(&self, user: UserId) -> StoreResult<Option<TotpRow>> {
        let user = user.0.to_string();
        let row = sqlx::query!(
            r#"SELECT secret_sealed, confirmed_at IS NOT NULL AS "confirmed!: bool", last_step
               FROM mfa_totp WHERE user_id = ?1"#,
            user,
        )
        .fetch_optional(&self.reader)
        .await
        .map_err(classify)?;
        Ok(row.map(|r| TotpRow {
            secret_sealed: r.secret_sealed,
            confirmed: r.confirmed,
            last_step: r.last_step,
        }))
    }

    async fn start_totp(&self, user: UserId, secret_sealed: &[u8]) -> StoreResult<bool> {
        let (user, sealed) = (user.0.to_string(), secret_sealed.to_vec());
        let now = now_us();
        let done = self
            .write_one(sqlx::query!(
                r#"INSERT INTO mfa_totp (user_id, secret_sealed, created_at) VALUES (?1, ?2, ?3)
                   ON CONFLICT (user_id) DO UPDATE
                       SET secret_sealed = excluded.secret_sealed, created_at = excluded.created_at
                       WHERE mfa_totp.confirmed_at IS NULL"#,
                user,
                sealed,
                now,
            ))
            .await?;
        Ok(done > 0)
    }

    async fn confirm_totp(
        &self,
        user: UserId,
        step: i64,
        recovery_hashes: &[Vec<u8>],
    ) -> StoreResult<bool> {
        let (user, hashes) = (user.0.to_string(), recovery_hashes.to_vec());
        self.writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let confirmed = sqlx::query!(
                        r#"UPDATE mfa_totp SET confirmed_at = ?2, last_step = ?3
                           WHERE user_id = ?1 AND confirmed_at IS NULL"#,
                        user,
                        now,
                        step,
                    )
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()
                        > 0;
                    if !confirmed {
                        return Ok(false);
                    }
                    sqlx::query!("DELETE FROM mfa_recovery_codes WHERE user_id = ?1", user)
                        .execute(&mut *conn)
                        .await?;
                    for hash in &hashes {
                        sqlx::query!(
                            "INSERT INTO mfa_recovery_codes (user_id, code_hash) VALUES (?1, ?2)",
                            user,
                            hash,
                        )
                        .execute(&mut *conn)
                        .await?;
                    }
                    Ok(true)
                })
            }))
            .await
    }

    async fn use_totp_step(&self, user: UserId, step: i64) -> StoreResult<bool> {
        let user = user.0.to_string();
        let done = self
            .write_one(sqlx::query!(
                r#"UPDATE mfa_totp SET last_step = ?2
                   WHERE user_id = ?1 AND confirmed_at IS NOT NULL AND last_step < ?2"#,
                user,
                step,
            ))
            .await?;
        Ok(done > 0)
    }

    async fn use_recovery_code(&self, user: UserId, code_hash: &[u8]) -> StoreResult<Option<i64>> {
        let (user, hash) = (user.0.to_string(), code_hash.to_vec());
        self.writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let used = sqlx::query!(
                        r#"UPDATE mfa_recovery_codes SET used_at = ?3
                           WHERE user_id = ?1 AND code_hash = ?2 AND used_at IS NULL"#,
                        user,
                        hash,
                        now,
                    )
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    if used == 0 {
                        return Ok(None);
                    }
                    let left = sqlx::query_scalar!(
                        r#"SELECT count(*) AS "left!: i64" FROM mfa_recovery_codes
                           WHERE user_id = ?1 AND used_at IS NULL"#,
                        user,
                    )
                    .fetch_one(&mut *conn)
                    .await?;
                    Ok(Some(left))
                })
            }))
            .await
    }

    async fn remove_totp(
        &self,
        user: UserId,
        keep: Option<SessionId>,
    ) -> StoreResult<Option<Vec<SessionId>>> {
        let user = user.0.to_string();
        let keep = keep.map(|s| s.0.to_string());
        let ended = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let removed = sqlx::query!("DELETE FROM mfa_totp WHERE user_id = ?1", user)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                    if removed == 0 {
                        return Ok(None);
                    }
                    sqlx::query!("DELETE FROM mfa_recovery_codes WHERE user_id = ?1", user)
                        .execute(&mut *conn)
                        .await?;
                    let ended = sqlx::query_scalar!(
                        r#"UPDATE sessions SET revoked_at = ?3, revoked_reason = 'mfa_removed'
                           WHERE user_id = ?1 AND revoked_at IS NULL
                             AND (?2 IS NULL OR id <> ?2)
                           RETURNING id"#,
                        user,
                        keep,
                        now,
                    )
                    .fetch_all(&mut *conn)
                    .await?;
                    Ok(Some(ended))
                })
            }))
            .await?;
        ended.map(ids).transpose()
    }

    async fn create_mfa_challenge(
        &self,
        token_hash: &[u8],
        c: &MfaChallenge,
        ttl_secs: i64,
    ) -> StoreResult<()> {
        let expires_at = now_us() + secs_us(ttl_secs);
        let (hash, user) = (token_hash.to_vec(), c.user_id.0.to_string());
        let (password_hash, device) = (c.password_hash.clone(), c.device_sealed.clone());
        let (remember_me, cookie) = (c.remember_me, c.cookie);
        self.write_one(sqlx::query!(
            r#"INSERT INTO mfa_challenges (token_hash, user_id, password_hash, remember_me,
                                           cookie, device_sealed, expires_at)
               VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"#,
            hash,
            user,
            password_hash,
            remember_me,
            cookie,
            device,
            expires_at,
        ))
        .await?;
        Ok(())
    }

    async fn mfa_challenge(&self, token_hash: &[u8]) -> StoreResult<Option<MfaChallenge>> {
        let now = now_us();
        let row = sqlx::query!(
            r#"SELECT user_id, password_hash, remember_me, cookie, device_sealed,
                      failures AS "failures!: i32"
               FROM mfa_challenges WHERE token_hash = ?1 AND expires_at > ?2"#,
            token_hash,
            now,
        )
        .fetch_optional(&self.reader)
        .await
        .map_err(classify)?;
        row.map(|r| {
            Ok(MfaChallenge {
                user_id: UserId(uuid(&r.user_id)?),
                password_hash: r.password_hash,
                remember_me: r.remember_me,
                cookie: r.cookie,
                device_sealed: r.device_sealed,
                failures: r.failures,
            })
        })
        .transpose()
    }

    async fn fail_mfa_challenge(&self, token_hash: &[u8]) -> StoreResult<i32> {
        let hash = token_hash.to_vec();
        let failures = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    sqlx::query_scalar!(
                        r#"UPDATE mfa_challenges SET failures = failures + 1
                           WHERE token_hash = ?1 RETURNING failures AS "failures!: i32""#,
                        hash,
                    )
                    .fetch_optional(&mut *conn)
                    .await
                })
            }))
            .await?;
        Ok(failures.unwrap_or(0))
    }

    async fn take_mfa_challenge(&self, token_hash: &[u8]) -> StoreResult<bool> {
        let hash = token_hash.to_vec();
        let now = now_us();
        let done = self
            .write_one(sqlx::query!(
                "DELETE FROM mfa_challenges WHERE token_hash = ?1 AND expires_at > ?2",
                hash,
                now,
            ))
            .await?;
        Ok(done > 0)
    }

    async fn delete_expired_mfa_challenges(&self, batch: i64) -> StoreResult<u64> {
        let now = now_us();
        self.write_one(sqlx::query!(
            r#"DELETE FROM mfa_challenges WHERE token_hash IN (
                   SELECT token_hash FROM mfa_challenges WHERE expires_at < ?1 LIMIT ?2
               )"#,
            now,
            batch,
        ))
        .await
    }

    async fn applied_user_migrations(&self) -> StoreResult<Vec<UserMigrationRecord>> {
        let rows = sqlx::query!(
            "SELECT version, name, checksum FROM user_migrations ORDER BY version ASC"
        )
        .fetch_all(&self.reader)
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
        let (record, ops) = (record.clone(), ops.to_vec());
        // A savepoint of its own: the writer may share its transaction with other work,
        // and only this file's writes are to be undone.
        let (outcome, ended) = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    sqlx::query("SAVEPOINT user_migration")
                        .execute(&mut *conn)
                        .await?;
                    let now = now_us();
                    let mut users = Vec::new();
                    let mut ended = Vec::new();
                    let mut failure = None;
                    for (i, op) in ops.iter().enumerate() {
                        if let Err(reason) =
                            apply_user_op(conn, op, now, &mut users, &mut ended).await?
                        {
                            failure = Some(OpFailure {
                                operation: i + 1,
                                reason,
                            });
                            break;
                        }
                    }
                    let recorded = failure.is_none()
                        && sqlx::query!(
                            r#"INSERT INTO user_migrations (version, name, checksum, applied_at)
                               VALUES (?1, ?2, ?3, ?4)
                               ON CONFLICT (version) DO NOTHING"#,
                            record.version,
                            record.name,
                            record.checksum,
                            now,
                        )
                        .execute(&mut *conn)
                        .await?
                        .rows_affected()
                            > 0;
                    if dry_run || !recorded {
                        sqlx::query("ROLLBACK TO user_migration")
                            .execute(&mut *conn)
                            .await?;
                    }
                    sqlx::query("RELEASE user_migration")
                        .execute(&mut *conn)
                        .await?;
                    Ok(match failure {
                        Some(failure) => (Err(failure), ended),
                        // Another `tessera migrate` applied it meanwhile.
                        None if !recorded => (Ok(None), ended),
                        None => (Ok(Some(users)), ended),
                    })
                })
            }))
            .await?;
        match outcome {
            Err(failure) => Ok(Err(failure)),
            Ok(None) => Err(StoreError::Conflict),
            Ok(Some(users)) => Ok(Ok(MigrationEffects {
                users: users
                    .iter()
                    .map(|u| uuid(u).map(UserId))
                    .collect::<StoreResult<_>>()?,
                ended: ids(ended)?,
            })),
        }
    }

    async fn claim_outbox(&self, limit: i64, lease_secs: i64) -> StoreResult<Vec<OutboxRow>> {
        // The one writer makes the claim atomic; the lease keeps a second instance on the
        // same file (the CLI's, say) from taking the same rows.
        let rows = self
            .writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let now = now_us();
                    let until = now + secs_us(lease_secs);
                    sqlx::query!(
                        r#"UPDATE outbox SET claimed_until = ?3, attempts = attempts + 1
                           WHERE id IN (SELECT id FROM outbox
                                        WHERE next_attempt_at <= ?1
                                          AND (claimed_until IS NULL OR claimed_until < ?1)
                                        ORDER BY id LIMIT ?2)
                           RETURNING id AS "id!", kind, payload, attempts AS "attempts!: i32",
                                     created_at"#,
                        now,
                        limit,
                        until,
                    )
                    .fetch_all(&mut *conn)
                    .await
                })
            }))
            .await?;
        let mut rows: Vec<OutboxRow> = rows
            .into_iter()
            .map(|r| OutboxRow {
                id: r.id,
                kind: r.kind,
                payload: r.payload,
                attempts: r.attempts,
                created_at: time(r.created_at),
            })
            .collect();
        rows.sort_by_key(|r| r.id);
        Ok(rows)
    }

    async fn delete_outbox(&self, id: i64) -> StoreResult<()> {
        self.write_one(sqlx::query!("DELETE FROM outbox WHERE id = ?1", id))
            .await?;
        Ok(())
    }

    async fn retry_outbox(&self, id: i64, after_secs: i64) -> StoreResult<()> {
        let at = now_us() + secs_us(after_secs);
        self.write_one(sqlx::query!(
            "UPDATE outbox SET claimed_until = NULL, next_attempt_at = ?2 WHERE id = ?1",
            id,
            at,
        ))
        .await?;
        Ok(())
    }

    async fn abandon_outbox(&self, id: i64, event: AuditEvent<'_>) -> StoreResult<()> {
        let audit = OwnedAudit::from(&event);
        self.writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    sqlx::query!("DELETE FROM outbox WHERE id = ?1", id)
                        .execute(&mut *conn)
                        .await?;
                    audit.insert(conn).await
                })
            }))
            .await
    }

    async fn outbox_len(&self) -> StoreResult<i64> {
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!: i64" FROM outbox"#)
            .fetch_one(&self.reader)
            .await
            .map_err(classify)
    }

    async fn record_audit(&self, e: AuditEvent<'_>) -> StoreResult<()> {
        let audit = OwnedAudit::from(&e);
        self.writer
            .write(Box::new(move |conn| Box::pin(audit.insert(conn))))
            .await
    }

    async fn record_event(&self, e: AuditEvent<'_>, webhooks: Vec<Vec<u8>>) -> StoreResult<()> {
        let audit = OwnedAudit::from(&e);
        self.writer
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    audit.insert(conn).await?;
                    let now = now_us();
                    for payload in &webhooks {
                        sqlx::query!(
                            r#"INSERT INTO outbox (kind, payload, created_at, next_attempt_at)
                               VALUES ('webhook', ?1, ?2, ?2)"#,
                            payload,
                            now,
                        )
                        .execute(&mut *conn)
                        .await?;
                    }
                    Ok(())
                })
            }))
            .await
    }

    async fn login_origins(&self, user: UserId, limit: i64) -> StoreResult<Vec<ClientInfo>> {
        let user = user.0.to_string();
        let rows = sqlx::query!(
            r#"SELECT ip, user_agent FROM audit_events
               WHERE user_id = ?1
                 AND (kind = 'login_succeeded' OR (kind = 'user_created' AND actor_id IS NULL))
               ORDER BY id DESC
               LIMIT ?2"#,
            user,
            limit,
        )
        .fetch_all(&self.reader)
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
            Some(AuditCursor::Time(t)) => (None, Some(us(t))),
            None => (None, None),
        };
        let user = q.user.map(|u| u.0.to_string());
        let rows = sqlx::query!(
            r#"SELECT id AS "id!", occurred_at, kind, user_id, session_id, actor_id, ip,
                      user_agent, detail, request_id
               FROM audit_events
               WHERE (?1 IS NULL OR user_id = ?1 OR actor_id = ?1)
                 AND (?2 IS NULL OR id < ?2)
                 AND (?3 IS NULL OR occurred_at < ?3)
               ORDER BY id DESC
               LIMIT ?4"#,
            user,
            before_id,
            before_time,
            q.limit,
        )
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        rows.into_iter().map(|r| audit_record!(r)).collect()
    }

    async fn delete_ended_sessions(
        &self,
        idle_ttl_secs: i64,
        retention_secs: i64,
        batch: i64,
    ) -> StoreResult<u64> {
        let now = now_us();
        let retained = now - secs_us(retention_secs);
        let idle_before = retained - secs_us(idle_ttl_secs);
        // Ended or past their absolute end: found through the indexes.
        let ended = self
            .write_one(sqlx::query!(
                r#"DELETE FROM sessions WHERE id IN (
                       SELECT id FROM sessions WHERE revoked_at < ?1 OR expires_at < ?1
                       LIMIT ?2
                   )"#,
                retained,
                batch,
            ))
            .await?;
        if ended >= batch as u64 {
            return Ok(ended);
        }
        // Idle too long: `last_used_at` has no index (every rotation writes it; see
        // migrations/sqlite/20261207000001_sessions_last_used_indexes.sql), so the scan
        // runs on a read connection, beside the writer, which is handed only the ids
        // (and checks them again: a refresh may have come meanwhile).
        let idle: Vec<String> = sqlx::query_scalar!(
            "SELECT id FROM sessions WHERE last_used_at < ?1 LIMIT ?2",
            idle_before,
            batch,
        )
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        if idle.is_empty() {
            return Ok(ended);
        }
        let ids = serde_json::to_string(&idle).map_err(|e| StoreError::Other(e.into()))?;
        let idle = self
            .write_one(sqlx::query!(
                r#"DELETE FROM sessions
                   WHERE id IN (SELECT value FROM json_each(?1)) AND last_used_at < ?2"#,
                ids,
                idle_before,
            ))
            .await?;
        Ok(ended + idle)
    }

    async fn delete_old_audit(&self, retention_secs: i64, batch: i64) -> StoreResult<u64> {
        let retained = now_us() - secs_us(retention_secs);
        self.write_one(sqlx::query!(
            r#"DELETE FROM audit_events WHERE id IN (
                   SELECT id FROM audit_events WHERE occurred_at < ?1 LIMIT ?2
               )"#,
            retained,
            batch,
        ))
        .await
    }

    async fn delete_expired_devices(&self, batch: i64) -> StoreResult<u64> {
        let now = now_us();
        self.write_one(sqlx::query!(
            r#"DELETE FROM devices WHERE token_hash IN (
                   SELECT token_hash FROM devices WHERE expires_at < ?1 LIMIT ?2
               )"#,
            now,
            batch,
        ))
        .await
    }

    async fn delete_old_email_tokens(&self, retention_secs: i64, batch: i64) -> StoreResult<u64> {
        let before = now_us() - secs_us(retention_secs);
        self.write_one(sqlx::query!(
            r#"DELETE FROM email_tokens WHERE token_hash IN (
                   SELECT token_hash FROM email_tokens WHERE expires_at < ?1 LIMIT ?2
               )"#,
            before,
            batch,
        ))
        .await
    }
}

/// The lock file beside the database: `data/tessera.db` → `data/tessera.lock`.
fn lock_file(db: &Path) -> PathBuf {
    db.with_extension("lock")
}

/// An [`AuditEvent`] with owned fields, to move into the writer's work.
struct OwnedAudit {
    kind: &'static str,
    user: Option<String>,
    session: Option<String>,
    actor: Option<String>,
    ip: Option<String>,
    user_agent: Option<String>,
    detail: String,
    request_id: Option<String>,
}

impl OwnedAudit {
    fn from(e: &AuditEvent<'_>) -> Self {
        OwnedAudit {
            kind: e.kind.as_str(),
            user: e.user_id.map(|u| u.0.to_string()),
            session: e.session_id.map(|s| s.0.to_string()),
            actor: e.actor_id.map(|u| u.0.to_string()),
            ip: e.client.ip.clone(),
            user_agent: e.client.user_agent.clone(),
            detail: e.detail.to_string(),
            request_id: e.client.request_id.clone(),
        }
    }

    async fn insert(self, conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
        let now = now_us();
        sqlx::query!(
            r#"INSERT INTO audit_events (occurred_at, kind, user_id, session_id, actor_id, ip,
                                         user_agent, detail, request_id)
               VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"#,
            now,
            self.kind,
            self.user,
            self.session,
            self.actor,
            self.ip,
            self.user_agent,
            self.detail,
            self.request_id,
        )
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// An [`EmailTokenGrant`] with owned fields, to move into the writer's work.
struct OwnedGrant {
    kind: &'static str,
    token_hash: Vec<u8>,
    expires_at: i64,
    new_email: Option<String>,
    new_email_normalized: Option<String>,
    message: Vec<u8>,
    notice: Option<Vec<u8>>,
}

impl From<EmailTokenGrant<'_>> for OwnedGrant {
    fn from(g: EmailTokenGrant<'_>) -> Self {
        OwnedGrant {
            kind: g.kind.as_str(),
            token_hash: g.token_hash.to_vec(),
            expires_at: us(g.expires_at),
            new_email: g.new_email.map(|e| e.as_str().to_owned()),
            new_email_normalized: g.new_email.map(|e| e.normalized()),
            message: g.message.to_vec(),
            notice: g.notice.map(<[u8]>::to_vec),
        }
    }
}

/// Stores an emailed token and its outbox row (in the writer's transaction).
async fn insert_email_token(
    conn: &mut SqliteConnection,
    user: &str,
    grant: &OwnedGrant,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"INSERT INTO email_tokens (token_hash, user_id, kind, new_email, new_email_normalized,
                                     created_at, expires_at)
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"#,
        grant.token_hash,
        user,
        grant.kind,
        grant.new_email,
        grant.new_email_normalized,
        now,
        grant.expires_at,
    )
    .execute(&mut *conn)
    .await?;
    for payload in std::iter::once(&grant.message).chain(&grant.notice) {
        enqueue(conn, user, payload, now).await?;
    }
    Ok(())
}

/// Writes an email about `user` to the outbox (in the writer's transaction).
async fn enqueue(
    conn: &mut SqliteConnection,
    user: &str,
    payload: &[u8],
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"INSERT INTO outbox (kind, user_id, payload, created_at, next_attempt_at)
           VALUES ('email', ?1, ?2, ?3, ?3)"#,
        user,
        payload,
        now,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Why an emailed token of `kind` could not be used, from its row.
async fn token_refusal(
    conn: &mut SqliteConnection,
    token_hash: &[u8],
    kind: &str,
    now: i64,
) -> Result<TokenRefusal, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT used_at IS NOT NULL AS "used!: bool", expires_at <= ?3 AS "expired!: bool"
           FROM email_tokens WHERE token_hash = ?1 AND kind = ?2"#,
        token_hash,
        kind,
        now,
    )
    .fetch_optional(conn)
    .await?;
    Ok(refusal(row.map(|r| (r.used, r.expired))))
}

/// Whether `user` is the only enabled admin (the one writer makes the answer hold for
/// the rest of its transaction).
/// Deletes a user and everything of theirs (see `Store::delete_user`); false if there
/// was none.
async fn delete_user_rows(conn: &mut SqliteConnection, user: &str) -> Result<bool, sqlx::Error> {
    sqlx::query!("DELETE FROM outbox WHERE user_id = ?1", user)
        .execute(&mut *conn)
        .await?;
    sqlx::query!(
        r#"UPDATE audit_events SET ip = NULL, user_agent = NULL
           WHERE user_id = ?1 OR actor_id = ?1"#,
        user,
    )
    .execute(&mut *conn)
    .await?;
    // Sessions (and their refresh tokens), devices and emailed tokens cascade.
    let deleted = sqlx::query!("DELETE FROM users WHERE id = ?1", user)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(deleted > 0)
}

/// One user migration operation in the writer's transaction: `Err` with why it cannot
/// be done (the caller rolls the file back). Users it changed and sessions it ended are
/// added to `users` and `ended`.
async fn apply_user_op(
    conn: &mut SqliteConnection,
    op: &UserOp,
    now: i64,
    users: &mut Vec<String>,
    ended: &mut Vec<String>,
) -> Result<Result<(), String>, sqlx::Error> {
    let email = match op {
        UserOp::Create {
            email,
            password_hash,
            roles,
            invitation,
        } => {
            let id = Uuid::new_v4().to_string();
            let (address, normalized, roles) =
                (email.as_str(), email.normalized(), roles_json(roles));
            let created = sqlx::query!(
                r#"INSERT INTO users (id, email, email_normalized, password_hash, roles,
                                      created_at, updated_at)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
                   ON CONFLICT (email_normalized) DO NOTHING"#,
                id,
                address,
                normalized,
                password_hash,
                roles,
                now,
            )
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if created == 0 {
                return Ok(Err(format!("a user with email {} exists", email.as_str())));
            }
            if let Some(invitation) = invitation {
                insert_email_token(conn, &id, &OwnedGrant::from(invitation.grant()), now).await?;
            }
            return Ok(Ok(()));
        }
        UserOp::Grant { email, .. }
        | UserOp::Revoke { email, .. }
        | UserOp::Disable { email }
        | UserOp::Delete { email } => email,
    };
    let normalized = email.normalized();
    let Some(found) = sqlx::query!(
        "SELECT id, roles FROM users WHERE email_normalized = ?1",
        normalized,
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(Err(format!(
            "there is no user with email {}",
            email.as_str()
        )));
    };
    let id = found.id;
    let removes_admin = match op {
        UserOp::Revoke { role, .. } => role == crate::domain::ADMIN_ROLE,
        UserOp::Disable { .. } | UserOp::Delete { .. } => true,
        _ => false,
    };
    if removes_admin && last_admin(conn, &id).await? {
        return Ok(Err(format!(
            "{} is the last enabled admin; make another user admin first",
            email.as_str()
        )));
    }
    let roles_now: Vec<String> =
        serde_json::from_str(&found.roles).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    let new_roles = match op {
        UserOp::Grant { role, .. } if !roles_now.contains(role) => {
            // Sorted, as the admin API and `parse_roles` keep them.
            let mut roles = [roles_now.clone(), vec![role.clone()]].concat();
            roles.sort();
            Some(roles)
        }
        UserOp::Revoke { role, .. } if roles_now.contains(role) => {
            Some(roles_now.iter().filter(|r| *r != role).cloned().collect())
        }
        _ => None,
    };
    let changed = match op {
        UserOp::Grant { .. } | UserOp::Revoke { .. } => match new_roles {
            Some(roles) => {
                let roles = roles_json(&roles);
                sqlx::query!(
                    "UPDATE users SET roles = ?2, updated_at = ?3 WHERE id = ?1",
                    id,
                    roles,
                    now,
                )
                .execute(&mut *conn)
                .await?;
                true
            }
            None => false,
        },
        UserOp::Disable { .. } => {
            let disabled = sqlx::query!(
                "UPDATE users SET disabled = TRUE, updated_at = ?2 WHERE id = ?1 AND NOT disabled",
                id,
                now,
            )
            .execute(&mut *conn)
            .await?
            .rows_affected()
                > 0;
            ended.extend(
                sqlx::query_scalar!(
                    r#"UPDATE sessions SET revoked_at = ?2, revoked_reason = 'user_disabled'
                       WHERE user_id = ?1 AND revoked_at IS NULL
                       RETURNING id"#,
                    id,
                    now,
                )
                .fetch_all(&mut *conn)
                .await?,
            );
            disabled
        }
        UserOp::Delete { .. } => delete_user_rows(conn, &id).await?,
        UserOp::Create { .. } => unreachable!("handled above"),
    };
    if changed {
        users.push(id);
    }
    Ok(Ok(()))
}

async fn last_admin(conn: &mut SqliteConnection, user: &str) -> Result<bool, sqlx::Error> {
    let admins = sqlx::query_scalar!(
        r#"SELECT id FROM users
           WHERE NOT disabled AND EXISTS (SELECT 1 FROM json_each(users.roles)
                                          WHERE json_each.value = 'admin')"#
    )
    .fetch_all(conn)
    .await?;
    Ok(admins == [user])
}
