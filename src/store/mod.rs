//! Persistence behind small interfaces, one folder per backend.
//!
//! - [`Store`] is what the domain needs from a durable database: users, sessions,
//!   refresh tokens, devices and audit events ([`sqlite::SqliteStore`], the embedded
//!   default, or [`postgres::PgStore`]; [`Backend::of`] picks one by the scheme of
//!   `database.url`).
//! - [`Revocations`] holds the short-lived revocation marks every instance honours, and
//!   [`FailureBudgets`] the per-account and per-device login failure budgets
//!   ([`redis::Denylist`] and [`redis::LoginFailures`], shared by every instance, or
//!   [`memory::MemoryMarks`] and [`memory::MemoryBudgets`] in one process).
//!
//! `auth/` names only these traits, so another backend is added beside the others
//! without touching the domain or the handlers.

pub mod copy;
pub mod memory;
// scripts/prepare-sqlx.sh checks each backend's queries in a pass of its own.
#[cfg(not(tessera_prepare = "sqlite"))]
pub mod postgres;
pub mod redis;
#[cfg(not(tessera_prepare = "postgres"))]
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::config::DatabaseSettings;
use crate::domain::{Email, SessionId, UserId};

/// The database `database.url` names, by its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://PATH` (or `sqlite:PATH`): the embedded default, one file.
    Sqlite,
    /// `postgres://…` or `postgresql://…`.
    Postgres,
}

impl Backend {
    pub fn of(url: &str) -> anyhow::Result<Self> {
        let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
        match scheme {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            _ => anyhow::bail!(
                "database.url must start with sqlite:// (the embedded database, e.g. \
                 sqlite://data/tessera.db) or postgres:// (e.g. \
                 postgres://user:password@host:5432/tessera)"
            ),
        }
    }

    pub fn from_settings(settings: &DatabaseSettings) -> anyhow::Result<Self> {
        Backend::of(settings.url.expose_secret())
    }

    /// Creates the database if it is missing and, with `migrate`, applies pending
    /// migrations.
    pub async fn prepare(self, settings: &DatabaseSettings, migrate: bool) -> anyhow::Result<()> {
        match self {
            Backend::Sqlite => sqlite::SqliteStore::prepare(settings, migrate).await,
            Backend::Postgres => postgres::PgStore::prepare(settings, migrate).await,
        }
    }

    /// The store, connecting on first use.
    pub fn connect_lazy(self, settings: &DatabaseSettings) -> anyhow::Result<Arc<dyn Store>> {
        Ok(match self {
            Backend::Sqlite => Arc::new(sqlite::SqliteStore::connect_lazy(settings)?),
            Backend::Postgres => Arc::new(postgres::PgStore::connect_lazy(settings)?),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint was violated (e.g. the email is taken).
    #[error("conflict")]
    Conflict,
    /// The change would leave no enabled admin.
    #[error("the last enabled admin")]
    LastAdmin,
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
    /// `None` for an anonymous user (`POST /users/anonymous`) not converted yet.
    pub email: Option<String>,
    pub roles: Vec<String>,
    pub disabled: bool,
    /// Whether the user has shown they read mail at `email` (a verification link, a
    /// password reset).
    pub email_verified: bool,
    pub created_at: DateTime<Utc>,
    /// When the user last started a session with their password.
    pub last_login_at: Option<DateTime<Utc>>,
}

impl User {
    /// The user's address, parsed; `None` for an anonymous user.
    pub fn address(&self) -> Option<Email> {
        self.email.as_deref().and_then(|e| Email::parse(e).ok())
    }

    /// Whether the user is anonymous (made by `POST /users/anonymous`, not converted).
    pub fn is_anonymous(&self) -> bool {
        self.roles
            .iter()
            .any(|r| r == crate::domain::ANONYMOUS_ROLE)
    }
}

/// A user's TOTP enrollment (see `crate::auth::mfa`).
#[derive(Debug, Clone)]
pub struct TotpRow {
    /// Sealed under the MFA key with the user id as context.
    pub secret_sealed: Vec<u8>,
    /// False while enrolling.
    pub confirmed: bool,
    /// The last time step a code was accepted for.
    pub last_step: i64,
}

/// A login waiting for its second factor.
#[derive(Debug, Clone)]
pub struct MfaChallenge {
    pub user_id: UserId,
    /// The hash the password was checked against (the session statement checks it).
    pub password_hash: String,
    pub remember_me: bool,
    /// Whether the login asked for cookie delivery.
    pub cookie: bool,
    /// The device token to hand back, sealed.
    pub device_sealed: Vec<u8>,
    /// Wrong codes so far.
    pub failures: i32,
}

/// One operation of a user migration (see `crate::auth::user_migrations`), checked and
/// ready for the store.
#[derive(Debug, Clone)]
pub enum UserOp {
    /// A new user with an argon2 hash; or, for an invitation, a hash nobody has the
    /// password of and a reset link (its token and sealed message) written with it.
    Create {
        email: Email,
        password_hash: String,
        roles: Vec<String>,
        invitation: Option<Invitation>,
    },
    Grant {
        email: Email,
        role: String,
    },
    Revoke {
        email: Email,
        role: String,
    },
    Disable {
        email: Email,
    },
    Delete {
        email: Email,
    },
}

/// The reset link an invitation writes: token hash, expiry and sealed message.
#[derive(Debug, Clone)]
pub struct Invitation {
    pub token_hash: Vec<u8>,
    pub expires_at: DateTime<Utc>,
    pub message: Vec<u8>,
}

impl Invitation {
    pub fn grant(&self) -> EmailTokenGrant<'_> {
        EmailTokenGrant {
            kind: EmailTokenKind::ResetPassword,
            token_hash: &self.token_hash,
            expires_at: self.expires_at,
            new_email: None,
            message: &self.message,
            notice: None,
        }
    }
}

/// A user migration file as recorded once applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserMigrationRecord {
    pub version: i64,
    pub name: String,
    /// SHA-256 of the file's bytes.
    pub checksum: Vec<u8>,
}

/// What a user migration changed that revocation marks must follow: users whose roles
/// changed or who were disabled or deleted, and the sessions that ended.
#[derive(Debug, Clone, Default)]
pub struct MigrationEffects {
    pub users: Vec<UserId>,
    pub ended: Vec<SessionId>,
}

/// Why a user migration's operation failed (its whole file is rolled back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpFailure {
    /// The operation's place in its file, from 1.
    pub operation: usize,
    pub reason: String,
}

/// What an emailed token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailTokenKind {
    VerifyEmail,
    ResetPassword,
    ConfirmEmailChange,
}

impl EmailTokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EmailTokenKind::VerifyEmail => "verify_email",
            EmailTokenKind::ResetPassword => "reset_password",
            EmailTokenKind::ConfirmEmailChange => "confirm_email_change",
        }
    }
}

/// An emailed token to store, with the message that carries it: both are written in
/// one transaction (with the change that asks for them, if any), so a token is never
/// stored without its message nor sent without being stored.
pub struct EmailTokenGrant<'a> {
    pub kind: EmailTokenKind,
    /// SHA-256 of the token.
    pub token_hash: &'a [u8],
    pub expires_at: DateTime<Utc>,
    /// The address an email change goes to.
    pub new_email: Option<&'a Email>,
    /// The outbox row's payload (sealed: see `crate::outbox`).
    pub message: &'a [u8],
    /// Another message written with it (a notice to the old address of an email change).
    pub notice: Option<&'a [u8]>,
}

/// Seals a notice (see `crate::auth::notice`) for the user and address it is given: for
/// a change whose user the store finds, so the notice goes to the address the user has
/// when the change commits, in the same transaction.
pub type NoticeFor = std::sync::Arc<dyn Fn(UserId, &str) -> Vec<u8> + Send + Sync>;

/// Why an emailed token was not accepted (`error_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Never issued, or made invalid by a newer one, or its user is gone.
    Unknown,
    Used,
    Expired,
}

/// What [`Store::reset_password`] did.
#[derive(Debug, Clone)]
pub struct PasswordReset {
    pub user: UserId,
    pub email_normalized: String,
    pub ended: Vec<SessionId>,
}

/// One message waiting in the outbox, claimed by this instance's sender.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    /// Which deliverer takes it ("email").
    pub kind: String,
    /// Sealed (see `crate::outbox`).
    pub payload: Vec<u8>,
    /// Attempts so far, this one included.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
}

/// A user with the password hash, for login only.
#[derive(Clone)]
pub struct Credentials {
    pub user: User,
    pub password_hash: String,
    /// Whether the device token asked about is a live device of this user.
    pub device_known: bool,
}

/// Who is asking, for session records and audit.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// The request's id (`X-Request-Id`), stored with the audit rows it writes.
    pub request_id: Option<String>,
}

/// `POST /me/reauthenticate` ([`Store::reauthenticate_session`]).
pub struct Reauthentication<'a> {
    pub session: SessionId,
    pub user: UserId,
    /// How the user authenticated this time (RFC 8176).
    pub amr: &'a [String],
    /// The session's new refresh token (generation 0 of a new chain) and chain secret.
    pub refresh_hash: &'a [u8],
    pub chain_hash: &'a [u8],
}

pub struct NewSession<'a> {
    pub id: SessionId,
    pub user_id: UserId,
    pub remember_me: bool,
    pub expires_at: DateTime<Utc>,
    pub refresh_hash: &'a [u8],
    /// The hash the password was verified against.
    pub password_hash: &'a str,
    pub client: &'a ClientInfo,
    /// Live sessions allowed per user (0: no cap); the least recently used are ended.
    pub max_per_user: u32,
    /// Sessions the cap ended this long ago or less are returned again, so that a
    /// retried login repairs a denylist write that failed (see `revoke_user_sessions`).
    pub recent_secs: i64,
    /// The device token to remember (new, or the known one presented, renewed).
    pub device_hash: &'a [u8],
    /// SHA-256 of the chain secret of the session's refresh tokens.
    pub chain_hash: &'a [u8],
    pub device_ttl_secs: i64,
    /// An outbox row written with the session (a `new_device` notice), sealed.
    pub notice: Option<&'a [u8]>,
    /// How the user authenticated (`pwd`, then `otp`); the session's `auth_time` is
    /// the statement's clock.
    pub amr: &'a [String],
}

/// What [`Store::create_session`] made.
#[derive(Debug, Clone)]
pub struct CreatedSession {
    /// Roles and the issue time come from the statement that locked the user row and
    /// created the session, so a concurrent role change or disable is either seen here
    /// or marks every token issued up to its commit (see `Store::clock`).
    pub grant: Grant,
    /// Sessions the per-user cap ended, now or recently.
    pub evicted: Vec<SessionId>,
}

/// What [`Store::rotate_refresh`] asks for.
pub struct Rotation<'a> {
    pub token_hash: &'a [u8],
    pub successor_hash: &'a [u8],
    /// The successor token sealed under a key derived from the presented token.
    pub successor_sealed: &'a [u8],
    pub idle_ttl_secs: i64,
    /// Tokens of the session rotated longer ago than this, but the one being rotated,
    /// are deleted (see `crate::auth::refresh_token`).
    pub grace_secs: i64,
    /// Whether to write the `refresh` audit row (`audit.refresh`).
    pub audit: bool,
    /// Rotate only if the client's User-Agent is the session's login's
    /// (`sessions.bind_user_agent`).
    pub bind_user_agent: bool,
    /// `[tokens.roles]` as JSON objects `{"role": seconds}`: a user holding a listed
    /// role idles out after the shortest of its roles' idle lifetimes (instead of
    /// `idle_ttl_secs`), and the session ends that long after its login.
    pub idle_by_role: &'a str,
    pub absolute_by_role: &'a str,
    pub client: &'a ClientInfo,
}

/// The session a refresh was granted for.
#[derive(Debug, Clone)]
pub struct Grant {
    pub session_id: SessionId,
    pub user_id: UserId,
    pub roles: Vec<String>,
    /// The user's `email_verified` when the statement that granted it ran.
    pub email_verified: bool,
    /// How the session's user last authenticated (RFC 8176: `pwd`, `otp`), and when:
    /// the login, or the latest reauthentication; kept across refreshes.
    pub amr: Vec<String>,
    pub auth_time: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Whether the login asked to be remembered (a browser keeps its refresh cookie
    /// across restarts only then).
    pub remember_me: bool,
    /// The database's clock when the statement that granted it ran: the access token's
    /// issue time, compared with per-user revocation marks taken from the same clock.
    pub issued_at: DateTime<Utc>,
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
    /// The User-Agent of the session's login (`sessions.bind_user_agent`).
    pub login_user_agent: Option<String>,
    /// When the session started (per-role absolute lifetimes count from it).
    pub created_at: DateTime<Utc>,
}

/// A live session as its owner (or an admin) sees it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: SessionId,
    pub remember_me: bool,
    pub created_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
    /// When the session ends if nothing else happens: the earlier of its absolute
    /// expiry and the end of its idle lifetime.
    pub expires_at: DateTime<Utc>,
    pub login_ip: Option<String>,
    pub login_user_agent: Option<String>,
    pub last_ip: Option<String>,
    pub last_user_agent: Option<String>,
}

/// What an admin may change on a user (`None`: leave as is).
#[derive(Debug, Clone, Default)]
pub struct UserChange {
    pub disabled: Option<bool>,
    pub roles: Option<Vec<String>>,
}

/// The result of [`Store::update_user`].
#[derive(Debug, Clone)]
pub struct UserUpdate {
    pub user: User,
    pub roles_changed: bool,
    /// Sessions ended because the user was disabled.
    pub ended: Vec<SessionId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    UserCreated,
    LoginSucceeded,
    LoginFailed,
    LoginThrottled,
    /// Written by [`Store::rotate_refresh`] in the same statement as the rotation.
    Refresh,
    RefreshReuseDetected,
    Logout,
    Revoke,
    SessionEnded,
    PasswordChanged,
    PasswordChangeFailed,
    UserDeletionFailed,
    AdminSessionsEnded,
    AdminUserUpdated,
    VerificationSent,
    EmailVerified,
    PasswordResetRequested,
    PasswordReset,
    EmailChangeRequested,
    EmailChanged,
    UserDeleted,
    InvitationSent,
    EmailDeliveryFailed,
    WebhookDeliveryFailed,
    AnonymousCreated,
    AnonymousConverted,
    UserMigrationApplied,
    MfaEnrollmentStarted,
    MfaEnabled,
    MfaCodeFailed,
    MfaRecoveryCodeUsed,
    MfaDisabled,
    MfaResetByAdmin,
    SessionClientChanged,
    StepUpPassed,
    StepUpFailed,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::UserCreated => "user_created",
            AuditKind::LoginSucceeded => "login_succeeded",
            AuditKind::LoginFailed => "login_failed",
            AuditKind::LoginThrottled => "login_throttled",
            AuditKind::Refresh => "refresh",
            AuditKind::RefreshReuseDetected => "refresh_reuse_detected",
            AuditKind::Logout => "logout",
            AuditKind::Revoke => "revoke",
            AuditKind::SessionEnded => "session_ended",
            AuditKind::PasswordChanged => "password_changed",
            AuditKind::PasswordChangeFailed => "password_change_failed",
            AuditKind::UserDeletionFailed => "user_deletion_failed",
            AuditKind::AdminSessionsEnded => "admin_sessions_ended",
            AuditKind::AdminUserUpdated => "admin_user_updated",
            AuditKind::VerificationSent => "verification_sent",
            AuditKind::EmailVerified => "email_verified",
            AuditKind::PasswordResetRequested => "password_reset_requested",
            AuditKind::PasswordReset => "password_reset",
            AuditKind::EmailChangeRequested => "email_change_requested",
            AuditKind::EmailChanged => "email_changed",
            AuditKind::UserDeleted => "user_deleted",
            AuditKind::InvitationSent => "invitation_sent",
            AuditKind::EmailDeliveryFailed => "email_delivery_failed",
            AuditKind::WebhookDeliveryFailed => "webhook_delivery_failed",
            AuditKind::AnonymousCreated => "anonymous_created",
            AuditKind::AnonymousConverted => "anonymous_converted",
            AuditKind::UserMigrationApplied => "user_migration_applied",
            AuditKind::MfaEnrollmentStarted => "mfa_enrollment_started",
            AuditKind::MfaEnabled => "mfa_enabled",
            AuditKind::MfaCodeFailed => "mfa_code_failed",
            AuditKind::MfaRecoveryCodeUsed => "mfa_recovery_code_used",
            AuditKind::MfaDisabled => "mfa_disabled",
            AuditKind::MfaResetByAdmin => "mfa_reset_by_admin",
            AuditKind::SessionClientChanged => "session_client_changed",
            AuditKind::StepUpPassed => "step_up_passed",
            AuditKind::StepUpFailed => "step_up_failed",
        }
    }
}

/// One audit row. Never holds a password, a token or a hash.
pub struct AuditEvent<'a> {
    pub kind: AuditKind,
    /// The user the event is about.
    pub user_id: Option<UserId>,
    pub session_id: Option<SessionId>,
    /// Who acted, when not the user themself (an admin).
    pub actor_id: Option<UserId>,
    pub client: &'a ClientInfo,
    pub detail: serde_json::Value,
}

/// A stored audit row, as `GET /admin/audit` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    pub kind: String,
    pub user_id: Option<Uuid>,
    pub session_id: Option<Uuid>,
    pub actor_id: Option<Uuid>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub detail: serde_json::Value,
    /// The `X-Request-Id` of the request that wrote it.
    pub request_id: Option<String>,
}

/// A page of the audit trail, newest first.
#[derive(Debug, Clone)]
pub struct AuditQuery {
    /// Events about this user or performed by them.
    pub user: Option<UserId>,
    pub before: Option<AuditCursor>,
    pub limit: i64,
}

#[derive(Debug, Clone, Copy)]
pub enum AuditCursor {
    /// Events with a smaller id (the `id` of the last event of the previous page).
    Id(i64),
    /// Events that happened earlier.
    Time(DateTime<Utc>),
}

/// The revocation marks (see [`redis::denylist`] for their kinds and lifetimes).
#[async_trait::async_trait]
pub trait Revocations: Send + Sync + 'static {
    /// Marks sessions revoked for `ttl` (the longest an access token can still live).
    async fn revoke_sessions(&self, sids: &[SessionId], ttl: Duration) -> anyhow::Result<()>;
    /// Marks one access token revoked until it expires. False when it already was.
    async fn revoke_token(&self, jti: &str, ttl: Duration) -> anyhow::Result<bool>;
    /// Marks a session revoked unless it already is: the repair of an earlier revocation
    /// whose write failed. True if it was written now.
    async fn ensure_session_revoked(&self, sid: SessionId, ttl: Duration) -> anyhow::Result<bool>;
    /// Revokes every access token of `user` issued at or before `at_ms` (Unix ms).
    async fn revoke_user_tokens(
        &self,
        user: UserId,
        at_ms: i64,
        ttl: Duration,
    ) -> anyhow::Result<()>;
    /// True when the token's session, the token itself, or every token of its user
    /// issued up to `issued_ms` is revoked.
    async fn is_revoked(
        &self,
        sid: SessionId,
        jti: &str,
        user: UserId,
        issued_ms: i64,
    ) -> anyhow::Result<bool>;
    /// Whether the marks are safe where they are kept (an error: unreachable).
    async fn health(&self) -> anyhow::Result<MarksHealth>;
    /// The in-memory copy of a shared backend, if this instance keeps one (diagnostics
    /// and tests).
    fn local_copy(&self) -> Option<&tessera_marks::Feed> {
        None
    }
    /// True when the marks live in this process only (no Redis).
    fn in_process(&self) -> bool {
        false
    }
}

/// What a revocation backend says about the safety of its marks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarksHealth {
    Ok,
    /// Reachable, but it may drop marks (a revoked token could work again): why.
    Unsafe(String),
    /// Reachable, but it will not say whether it may drop marks.
    Unknown,
}

/// What the gate said about one password attempt.
#[derive(Debug)]
pub enum Gate {
    /// Go ahead: the place is reserved; report the outcome with [`FailureBudgets::finish`].
    Reserved(Place),
    /// Every free place is held by an attempt in flight: ask again shortly.
    Busy,
    /// Come back after this long (429).
    Wait(Duration),
    /// A budget without delay (a device's) is used up.
    Exhausted,
}

/// A reserved place in one budget.
#[derive(Debug, Clone)]
pub struct Place {
    pub budget: Budget,
    /// The budget's key as given to [`FailureBudgets::reserve`].
    pub key: String,
    /// This attempt.
    pub id: String,
    /// False for a budget that is switched off: nothing to give back.
    pub counted: bool,
}

/// How a reserved attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Failed,
    Succeeded,
    /// The password was not checked (the hash could not run, the request was dropped).
    Abandoned,
}

/// Which budget an attempt is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Budget {
    /// Shared by everyone who types that email, with growing delays.
    Account,
    /// One known device of the account, with no delay: used up, it stops being known.
    Device,
}

impl Place {
    /// A new place for one attempt (a fresh random id).
    pub fn new(budget: Budget, key: &str, counted: bool) -> Self {
        Place {
            budget,
            key: key.to_owned(),
            id: uuid::Uuid::new_v4().simple().to_string(),
            counted,
        }
    }
}

/// How long a reserved place is held at most: longer than any queue wait plus hash (a
/// crashed instance's places free themselves after it).
pub const BUDGET_LEASE: Duration = Duration::from_secs(30);

/// The failure budgets' settings, as every backend applies them.
#[derive(Debug, Clone, Copy)]
pub struct BudgetRules {
    pub free: u32,
    pub device_free: u32,
    pub delay_base: Duration,
    pub delay_max: Duration,
    pub window: Duration,
}

impl BudgetRules {
    pub fn from_settings(settings: &crate::config::LoginSettings) -> Self {
        BudgetRules {
            free: settings.free_failures,
            device_free: settings.device_free_failures,
            delay_base: Duration::from_secs(settings.delay_base_secs),
            delay_max: Duration::from_secs(settings.delay_max_secs),
            window: Duration::from_secs(settings.failure_window_secs.max(1)),
        }
    }

    /// A budget's free failures and base delay (a device's has none).
    pub fn limits(&self, budget: Budget) -> (u32, Duration) {
        match budget {
            Budget::Account => (self.free, self.delay_base),
            Budget::Device => (self.device_free, Duration::ZERO),
        }
    }

    /// The answer for a budget that is switched off (no free failures, no delay): an
    /// account budget counts nothing, a device is never known. `None` when it is on.
    pub fn switched_off(&self, budget: Budget, key: &str) -> Option<Gate> {
        let (free, base) = self.limits(budget);
        (free == 0 && base.is_zero()).then(|| match budget {
            Budget::Account => Gate::Reserved(Place::new(budget, key, false)),
            Budget::Device => Gate::Exhausted,
        })
    }
}

/// Login failure budgets (see [`redis::login_failures`] for the rules).
#[async_trait::async_trait]
pub trait FailureBudgets: Send + Sync + 'static {
    /// Asks to reserve a place for one attempt on `key` (a normalized email, or a
    /// device token's hash in hex) in `budget`.
    async fn reserve(&self, budget: Budget, key: &str) -> anyhow::Result<Gate>;
    /// Gives the place back and records how the attempt ended.
    async fn finish(&self, place: &Place, outcome: Outcome) -> anyhow::Result<()>;
    /// Forgets a budget's failures, as a success in it does.
    async fn reset(&self, budget: Budget, key: &str) -> anyhow::Result<()>;
}

/// A revocation mark as the database keeps it for the in-process backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedMark {
    /// `revoked:<kind>:<id>`, as in Redis without the prefix.
    pub key: String,
    pub value: i64,
    pub expires_at: DateTime<Utc>,
}

/// A connection pool's state, for the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolStatus {
    pub in_use: u32,
    pub idle: u32,
    pub max: u32,
}

impl PoolStatus {
    pub fn of<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> Self {
        let idle = pool.num_idle() as u32;
        PoolStatus {
            in_use: pool.size().saturating_sub(idle),
            idle,
            max: pool.options().get_max_connections(),
        }
    }
}

/// [`Store::probe_acquire`] on `pool`.
pub async fn probe_acquire<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> Result<std::time::Duration, sqlx::Error> {
    let started = std::time::Instant::now();
    let conn = pool.acquire().await?;
    let took = started.elapsed();
    drop(conn);
    Ok(took)
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which database this is ("postgres", "sqlite"), as readiness reports it.
    fn name(&self) -> &'static str;
    async fn ping(&self) -> StoreResult<()>;
    /// The pool requests take connections from (SQLite: the reading connections).
    fn pool_status(&self) -> PoolStatus;
    /// Takes a pooled connection as a request would and gives it back: how long the
    /// taking took (the metrics' acquire time).
    async fn probe_acquire(&self) -> StoreResult<std::time::Duration>;
    /// The database's clock, read after whatever the caller committed: the time of a
    /// per-user revocation mark, so that every token issued by a statement that did not
    /// see the change (the `issued_at` of its grant is earlier) is covered by the mark.
    async fn clock(&self) -> StoreResult<DateTime<Utc>>;

    /// Saves a revocation mark that the database does not otherwise hold (a per-user
    /// cut-off, a single access token), keeping the later value and expiry of two.
    /// True when there was none.
    async fn save_mark(
        &self,
        key: &str,
        value: i64,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Every live mark: the saved ones and those of the sessions ended less than
    /// `session_mark_secs` ago (each living that long from its end).
    async fn live_marks(&self, session_mark_secs: i64) -> StoreResult<Vec<SavedMark>>;
    /// Deletes up to `batch` expired saved marks.
    async fn delete_expired_marks(&self, batch: i64) -> StoreResult<u64>;
    /// Holds, for the life of the process, the claim to be the only instance keeping
    /// revocations in process on this database; false when another instance holds it.
    async fn claim_single_instance(&self) -> StoreResult<bool>;

    /// Creates a user; with `verification`, stores that token for them and its message
    /// in the same transaction.
    async fn create_user(
        &self,
        email: &Email,
        password_hash: &str,
        roles: &[String],
        verification: Option<EmailTokenGrant<'_>>,
    ) -> StoreResult<User>;
    /// The user with this email, and whether `device` (a device token's hash) is one of
    /// their live devices.
    async fn find_credentials(
        &self,
        email: &Email,
        device: Option<&[u8]>,
    ) -> StoreResult<Option<Credentials>>;
    async fn find_user(&self, id: UserId) -> StoreResult<Option<User>>;
    /// Creates an anonymous user: no email, the role `anonymous`, and a password hash
    /// nobody has the password of (it only lets the store's session check pass).
    async fn create_anonymous(&self, password_hash: &str) -> StoreResult<User>;
    /// Gives an anonymous user an email, a password and `roles`, keeping its id (and its
    /// sessions), with the verification link if any in the same transaction. `None`
    /// when the user is not anonymous (any more) or is disabled; `StoreError::Conflict`
    /// when another account has the email.
    async fn convert_anonymous(
        &self,
        user: UserId,
        email: &Email,
        password_hash: &str,
        roles: &[String],
        verification: Option<EmailTokenGrant<'_>>,
    ) -> StoreResult<Option<User>>;
    /// Up to `batch` anonymous users made more than `retention_secs` ago with no session
    /// used since then: the cleanup deletes them.
    async fn idle_anonymous_users(
        &self,
        retention_secs: i64,
        batch: i64,
    ) -> StoreResult<Vec<UserId>>;
    /// Users with an email (anonymous ones have none) sorted by normalized email: those
    /// starting with `prefix` (normalized), after
    /// the normalized email `after`, at most `limit`.
    async fn list_users(
        &self,
        prefix: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<User>>;
    /// Swaps a user's password hash, only if it is still `old`.
    async fn replace_password_hash(&self, user: UserId, old: &str, new: &str) -> StoreResult<()>;

    /// Creates a session with its first refresh token and remembers the device, but only
    /// if the user is still enabled and still has `password_hash` (the one the login was
    /// verified against), so a login racing a password change or a disable cannot
    /// outlive it. Returns `None` if refused.
    async fn create_session(&self, new: NewSession<'_>) -> StoreResult<Option<CreatedSession>>;
    /// Rotates a live, unrotated refresh token in one statement (which also writes the
    /// `refresh` audit row). `None` when the token is unknown, already rotated, or its
    /// session is not live: see [`Store::refresh_state`].
    async fn rotate_refresh(&self, rotation: Rotation<'_>) -> StoreResult<Option<Grant>>;
    /// A live session of an enabled user gets a new authentication (`amr`, `auth_time`
    /// now) and a new chain: its refresh tokens are replaced by the new one, so a token
    /// from before is unknown from then on (not reuse: the owner just proved who they
    /// are). `None` if the session has ended or the user is disabled.
    async fn reauthenticate_session(&self, r: Reauthentication<'_>) -> StoreResult<Option<Grant>>;
    async fn refresh_state(&self, token_hash: &[u8]) -> StoreResult<Option<RefreshState>>;
    /// The state of session `session` if its chain secret hashes to `secret_hash`, with
    /// the session's current generation: for a chain token whose row is gone.
    /// `rotated_at` and `successor_sealed` are `None` (no row).
    async fn chain_state(
        &self,
        session: SessionId,
        secret_hash: &[u8],
    ) -> StoreResult<Option<(RefreshState, i64)>>;

    /// Ends one session; returns its user if it was live. `notice` (only if it was live)
    /// is written to the outbox in the same transaction.
    async fn revoke_session(
        &self,
        id: SessionId,
        reason: &str,
        notice: Option<NoticeFor>,
    ) -> StoreResult<Option<UserId>>;
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

    /// The user's live sessions, most recently used first.
    async fn list_sessions(
        &self,
        user: UserId,
        idle_ttl_secs: i64,
    ) -> StoreResult<Vec<SessionInfo>>;
    /// Ends one session if it belongs to `user`. True if it was live, or was ended within
    /// `recent_secs` (so a retry after a failed denylist write can mark it again).
    async fn revoke_own_session(
        &self,
        user: UserId,
        id: SessionId,
        reason: &str,
        recent_secs: i64,
    ) -> StoreResult<bool>;
    /// Replaces the password hash if it is still `old`, and ends every other session of
    /// the user in the same statement. `None` if the hash changed meanwhile. `notice`, a
    /// sealed outbox row, is written with the change.
    async fn change_password(
        &self,
        user: UserId,
        old: &str,
        new: &str,
        keep: SessionId,
        notice: Option<&[u8]>,
    ) -> StoreResult<Option<Vec<SessionId>>>;
    /// Applies an admin's change; disabling also ends every session. `None`: no such user;
    /// [`StoreError::LastAdmin`] when it would leave no enabled admin.
    async fn update_user(
        &self,
        user: UserId,
        change: &UserChange,
    ) -> StoreResult<Option<UserUpdate>>;

    /// Stores an emailed token for `user` and its message in one transaction, deleting
    /// the user's unused tokens of the same kind (the newest wins). False when there is
    /// no such user (any more).
    async fn issue_email_token(
        &self,
        user: UserId,
        grant: EmailTokenGrant<'_>,
    ) -> StoreResult<bool>;
    /// Uses a `verify_email` token: marks it used and the user's email verified.
    async fn verify_email(&self, token_hash: &[u8]) -> StoreResult<Result<UserId, TokenRefusal>>;

    /// Uses a `confirm_email_change` token: the user's email becomes the token's new
    /// address, verified. `StoreError::Conflict` when another account took the address
    /// meanwhile (nothing changes then, and the token stays unused).
    async fn confirm_email_change(
        &self,
        token_hash: &[u8],
    ) -> StoreResult<Result<User, TokenRefusal>>;
    /// Whether an account other than `except` has this address.
    async fn email_taken(&self, email: &Email, except: UserId) -> StoreResult<bool>;

    /// Uses a `reset_password` token: sets the new password hash, counts the address as
    /// verified and ends every session of the user, in one transaction. The user, their
    /// normalized email and the sessions it ended. `notice` is written to the outbox in
    /// the same transaction.
    async fn reset_password(
        &self,
        token_hash: &[u8],
        new_hash: &str,
        notice: Option<NoticeFor>,
    ) -> StoreResult<Result<PasswordReset, TokenRefusal>>;

    /// The user's TOTP enrollment, if any.
    async fn totp(&self, user: UserId) -> StoreResult<Option<TotpRow>>;
    /// Starts (or starts again) an enrollment with a new secret; false when the user
    /// has a confirmed one (it must be removed first).
    async fn start_totp(&self, user: UserId, secret_sealed: &[u8]) -> StoreResult<bool>;
    /// Confirms an enrollment with a code of `step`, replacing the user's recovery codes
    /// by `recovery_hashes`, in one transaction; false when not enrolling.
    async fn confirm_totp(
        &self,
        user: UserId,
        step: i64,
        recovery_hashes: &[Vec<u8>],
    ) -> StoreResult<bool>;
    /// Records that a code of `step` was used; false when a code of this or a later
    /// step was used already (a replay), or TOTP is not confirmed.
    async fn use_totp_step(&self, user: UserId, step: i64) -> StoreResult<bool>;
    /// Uses an unused recovery code; how many are left, or `None` if it is not one.
    async fn use_recovery_code(&self, user: UserId, code_hash: &[u8]) -> StoreResult<Option<i64>>;
    /// Removes the user's TOTP and recovery codes and ends every session but `keep`, in
    /// one transaction; the sessions ended, or `None` when there was no TOTP.
    async fn remove_totp(
        &self,
        user: UserId,
        keep: Option<SessionId>,
    ) -> StoreResult<Option<Vec<SessionId>>>;
    async fn create_mfa_challenge(
        &self,
        token_hash: &[u8],
        challenge: &MfaChallenge,
        ttl_secs: i64,
    ) -> StoreResult<()>;
    /// A challenge that has not expired.
    async fn mfa_challenge(&self, token_hash: &[u8]) -> StoreResult<Option<MfaChallenge>>;
    /// Counts a wrong code against a challenge; the wrong codes now (0: it is gone).
    async fn fail_mfa_challenge(&self, token_hash: &[u8]) -> StoreResult<i32>;
    /// Deletes a challenge; true for the one caller that did (it then starts the session).
    async fn take_mfa_challenge(&self, token_hash: &[u8]) -> StoreResult<bool>;
    /// Deletes up to `batch` expired challenges.
    async fn delete_expired_mfa_challenges(&self, batch: i64) -> StoreResult<u64>;

    /// The user migrations applied so far, by version.
    async fn applied_user_migrations(&self) -> StoreResult<Vec<UserMigrationRecord>>;
    /// Applies one user migration's operations in order and records it, all in one
    /// transaction: the first operation that fails rolls the whole file back. With
    /// `dry_run`, everything is done and then rolled back (what would change, and
    /// whether it would fail).
    async fn apply_user_migration(
        &self,
        record: &UserMigrationRecord,
        ops: &[UserOp],
        dry_run: bool,
    ) -> StoreResult<Result<MigrationEffects, OpFailure>>;

    /// Deletes a user and everything of theirs in one transaction: sessions, refresh
    /// tokens, devices, emailed tokens, waiting outbox rows; their audit rows keep only
    /// ids (addresses and user agents are cleared). False: no such user;
    /// [`StoreError::LastAdmin`] for the last enabled admin.
    async fn delete_user(&self, user: UserId) -> StoreResult<bool>;

    /// Claims up to `limit` outbox rows that are due and not claimed by a live lease, for
    /// `lease_secs`, counting an attempt on each; oldest first.
    async fn claim_outbox(&self, limit: i64, lease_secs: i64) -> StoreResult<Vec<OutboxRow>>;
    /// Deletes a delivered row.
    async fn delete_outbox(&self, id: i64) -> StoreResult<()>;
    /// Releases a row whose delivery failed, due again in `after_secs`.
    async fn retry_outbox(&self, id: i64, after_secs: i64) -> StoreResult<()>;
    /// Deletes a row given up on and records why, in one transaction.
    async fn abandon_outbox(&self, id: i64, event: AuditEvent<'_>) -> StoreResult<()>;
    /// How many rows wait in the outbox (diagnostics and tests).
    async fn outbox_len(&self) -> StoreResult<i64>;

    async fn record_audit(&self, event: AuditEvent<'_>) -> StoreResult<()>;
    /// An audit row and the webhook deliveries that report it (sealed outbox rows of
    /// kind "webhook", with no user: deleting a user must not take its
    /// `user.deleted` along), in one transaction.
    async fn record_event(&self, event: AuditEvent<'_>, webhooks: Vec<Vec<u8>>) -> StoreResult<()>;
    /// Where the user's latest `limit` logins (and their own registration) came from,
    /// newest first, from the audit rows: what a `new_device` notice compares with.
    async fn login_origins(&self, user: UserId, limit: i64) -> StoreResult<Vec<ClientInfo>>;
    async fn list_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>>;

    /// Deletes up to `batch` sessions (their refresh tokens cascade) that ended more
    /// than `retention_secs` ago; returns how many. Run repeatedly until it returns
    /// less than `batch`; `SKIP LOCKED` keeps instances from waiting on each other.
    async fn delete_ended_sessions(
        &self,
        idle_ttl_secs: i64,
        retention_secs: i64,
        batch: i64,
    ) -> StoreResult<u64>;
    /// Deletes up to `batch` audit rows older than `retention_secs`; returns how many.
    async fn delete_old_audit(&self, retention_secs: i64, batch: i64) -> StoreResult<u64>;
    /// Deletes up to `batch` expired devices; returns how many.
    async fn delete_expired_devices(&self, batch: i64) -> StoreResult<u64>;
    /// Deletes up to `batch` emailed tokens, used or not, that expired more than
    /// `retention_secs` ago (until then a late use still learns `used` or `expired`).
    async fn delete_old_email_tokens(&self, retention_secs: i64, batch: i64) -> StoreResult<u64>;
}

/// Whether two role lists differ as sets (order and repeats aside).
pub(crate) fn roles_differ(old: &[String], new: &[String]) -> bool {
    use std::collections::BTreeSet;
    old.iter().collect::<BTreeSet<_>>() != new.iter().collect::<BTreeSet<_>>()
}

/// Why a token that could not be used was refused, from its row (used, expired), if any.
pub(crate) fn refusal(row: Option<(bool, bool)>) -> TokenRefusal {
    match row {
        Some((true, _)) => TokenRefusal::Used,
        Some((false, true)) => TokenRefusal::Expired,
        // No row; or one that was live a moment ago but whose use did not take (its user
        // went meanwhile).
        _ => TokenRefusal::Unknown,
    }
}

/// Helper for ids coming back from SQL.
pub(crate) fn session_ids(ids: Vec<Uuid>) -> Vec<SessionId> {
    ids.into_iter().map(SessionId).collect()
}
