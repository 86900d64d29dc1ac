//! Persistence behind small interfaces.
//!
//! [`Store`] is what the domain needs from a durable database: users, sessions, refresh
//! tokens and audit events. [`postgres::PgStore`] implements it; an embedded backend can
//! be added beside it without touching the domain or the handlers. [`denylist::Denylist`]
//! is the Redis side: short-lived revocation marks that every instance reads.

pub mod denylist;
pub mod postgres;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::{Email, SessionId, UserId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint was violated (e.g. the email is taken).
    #[error("conflict")]
    Conflict,
    /// The backing service cannot be reached; the caller should retry.
    #[error("store unavailable: {0:#}")]
    Unavailable(anyhow::Error),
    #[error("store error: {0:#}")]
    Other(anyhow::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone)]
pub struct User {
    pub id: UserId,
    pub email: String,
    pub roles: Vec<String>,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
}

/// A user with the password hash, for login only.
#[derive(Clone)]
pub struct Credentials {
    pub user: User,
    pub password_hash: String,
}

/// Who is asking, for session records and audit.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

pub struct NewSession<'a> {
    pub id: SessionId,
    pub user_id: UserId,
    pub remember_me: bool,
    pub expires_at: DateTime<Utc>,
    pub refresh_hash: &'a [u8],
    pub client: &'a ClientInfo,
    /// Live sessions allowed per user (0: no cap); the least recently used are ended.
    pub max_per_user: u32,
    /// Sessions the cap ended this long ago or less are returned again, so that a
    /// retried login repairs a denylist write that failed (see `revoke_user_sessions`).
    pub recent_secs: i64,
}

/// What [`Store::rotate_refresh`] asks for.
pub struct Rotation<'a> {
    pub token_hash: &'a [u8],
    pub successor_hash: &'a [u8],
    /// The successor token sealed under a key derived from the presented token.
    pub successor_sealed: &'a [u8],
    pub idle_ttl_secs: i64,
    pub client: &'a ClientInfo,
}

/// The session a refresh was granted for.
#[derive(Debug, Clone)]
pub struct Grant {
    pub session_id: SessionId,
    pub user_id: UserId,
    pub roles: Vec<String>,
    pub expires_at: DateTime<Utc>,
}

/// Everything needed to explain why a refresh token was not rotated.
#[derive(Debug, Clone)]
pub struct RefreshState {
    pub grant: Grant,
    pub rotated_at: Option<DateTime<Utc>>,
    pub successor_sealed: Option<Vec<u8>>,
    pub last_used_at: DateTime<Utc>,
    /// When the session was ended, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    pub disabled: bool,
    /// The database's clock, so every instance judges lifetimes by one clock.
    pub now: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    UserCreated,
    LoginSucceeded,
    LoginFailed,
    RefreshReuseDetected,
    Logout,
    Revoke,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::UserCreated => "user_created",
            AuditKind::LoginSucceeded => "login_succeeded",
            AuditKind::LoginFailed => "login_failed",
            AuditKind::RefreshReuseDetected => "refresh_reuse_detected",
            AuditKind::Logout => "logout",
            AuditKind::Revoke => "revoke",
        }
    }
}

/// One audit row. Never holds a password, a token or a hash.
pub struct AuditEvent<'a> {
    pub kind: AuditKind,
    pub user_id: Option<UserId>,
    pub session_id: Option<SessionId>,
    pub client: &'a ClientInfo,
    pub detail: serde_json::Value,
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn ping(&self) -> StoreResult<()>;

    async fn create_user(
        &self,
        email: &Email,
        password_hash: &str,
        roles: &[String],
    ) -> StoreResult<User>;
    async fn find_credentials(&self, email: &Email) -> StoreResult<Option<Credentials>>;
    async fn find_user(&self, id: UserId) -> StoreResult<Option<User>>;
    /// Swaps a user's password hash, only if it is still `old`.
    async fn replace_password_hash(&self, user: UserId, old: &str, new: &str) -> StoreResult<()>;

    /// Creates a session with its first refresh token; returns the sessions that the
    /// per-user cap ended to make room, now or within `recent_secs`.
    async fn create_session(&self, new: NewSession<'_>) -> StoreResult<Vec<SessionId>>;
    /// Rotates a live, unrotated refresh token in one statement. `None` when the token is
    /// unknown, already rotated, or its session is not live: see [`Store::refresh_state`].
    async fn rotate_refresh(&self, rotation: Rotation<'_>) -> StoreResult<Option<Grant>>;
    async fn refresh_state(&self, token_hash: &[u8]) -> StoreResult<Option<RefreshState>>;

    /// Ends one session; returns its user if it was live.
    async fn revoke_session(&self, id: SessionId, reason: &str) -> StoreResult<Option<UserId>>;
    /// Ends every live session of a user, but `except`. Returns the sessions it ended
    /// and those already ended within the last `recent_secs`: a retry after a failed
    /// denylist write marks them all again, so none keeps working by accident.
    async fn revoke_user_sessions(
        &self,
        user: UserId,
        except: Option<SessionId>,
        reason: &str,
        recent_secs: i64,
    ) -> StoreResult<Vec<SessionId>>;

    async fn record_audit(&self, event: AuditEvent<'_>) -> StoreResult<()>;
}

/// Helper for ids coming back from SQL.
pub(crate) fn session_ids(ids: Vec<Uuid>) -> Vec<SessionId> {
    ids.into_iter().map(SessionId).collect()
}
