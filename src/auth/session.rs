//! The token lifecycle: login, refresh rotation with reuse detection, revocation.
//!
//! Guarantees:
//! - a refresh token is rotated on every use by one conditional statement, so of two
//!   racing requests exactly one rotates; the other (and any retry within the grace
//!   window) receives the *same* successor, so chains never fork;
//! - a rotated token presented after the grace window revokes its whole session,
//!   including every access token issued under it (one denylist write per session);
//! - ending a session writes the database first (refresh fails) and then the denylist
//!   (access tokens fail on every instance at once); if either is down the caller gets
//!   503 and can retry, since both writes are idempotent.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use super::access_token::{AccessTokens, Claims};
use super::device::DeviceToken;
pub use super::mfa::LoginOutcome;
use super::password::{HashError, PasswordHasherPool};
use super::recent::Recent;
use super::refresh_token::RefreshToken;
use super::throttle::{LoginThrottle, MailThrottle};
use crate::config::{EmailVerification, NoticeKind, Settings};
use crate::domain::{Email, Password, SessionId, UserId};
use crate::error::{ApiError, GrantFailure};
use crate::outbox::Outbox;
use crate::store::{
    AuditEvent, AuditKind, ClientInfo, CreatedSession, FailureBudgets, Grant, NewSession, Outcome,
    RefreshState, Revocations, Rotation, Store, User,
};

/// What login and refresh hand back to the client.
pub struct TokenGrant {
    pub access_token: String,
    pub expires_in: i64,
    pub refresh_token: RefreshToken,
    pub refresh_token_expires_in: i64,
    pub session_id: SessionId,
    /// Seconds until the session's absolute end (a remembered browser session's
    /// refresh cookie lives that long).
    pub session_expires_in: i64,
    /// Whether the login asked to be remembered.
    pub remember_me: bool,
    /// Only from a successful login: the device token to keep (see [`super::device`]).
    pub device_token: Option<DeviceToken>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogoutScope {
    Local,
    Others,
    Global,
}

/// How much later than a token's issue time (whole seconds, so up to a second early)
/// a remembered email must have been read to serve `GET /me` for it: the second the
/// `iat` claim drops, plus a second of clock difference between instances.
const EMAIL_FRESH_MARGIN_SECS: i64 = 2;

/// How long a remembered profile that can change without revoking anything (an address
/// not yet verified, an anonymous user's absent one) may serve `GET /me` after it was
/// read: on the instance that verifies the address it is forgotten at once, on the
/// others it is read again within this time.
const UNSETTLED_PROFILE_SECS: Duration = Duration::from_secs(1);

/// What the service seals at rest: outbox rows, and second-factor secrets (each under
/// its own secret of `keys.dir`).
pub struct Sealing {
    pub outbox: Arc<Outbox>,
    pub mfa: crate::seal::Sealer,
}

impl Sealing {
    /// `mfa_secret`: the bytes of `keys.dir/mfa.secret`.
    pub fn new(outbox: Arc<Outbox>, mfa_secret: &[u8]) -> Self {
        Sealing {
            outbox,
            mfa: crate::seal::Sealer::new("tessera/mfa/v1", mfa_secret),
        }
    }
}

/// What `GET /me` shows beyond the token's claims ([`AuthService::profile_of`]).
#[derive(Clone)]
pub struct Profile {
    /// `None` for an anonymous user.
    pub email: Option<Arc<str>>,
    pub email_verified: bool,
    /// Whether a second factor (TOTP) is on.
    pub mfa: bool,
}

/// What `POST /login` asks for.
pub struct LoginRequest {
    pub email: Email,
    pub password: Password,
    pub remember_me: bool,
    /// The client's device token, if it has one.
    pub device: Option<DeviceToken>,
    /// Whether the tokens go in cookies (kept for the second step of an MFA login).
    pub cookie: bool,
}

/// A session to start ([`AuthService::open_session`]).
pub(super) struct SessionStart<'a> {
    pub user: UserId,
    /// The hash the password was checked against: the statement that creates the
    /// session checks the user still has it and is enabled.
    pub password_hash: &'a str,
    pub remember_me: bool,
    /// The device token to remember (new, or the known one renewed).
    pub device: &'a DeviceToken,
    /// An outbox row written with the session (a `new_device` notice).
    pub notice: Option<&'a [u8]>,
    /// How the user authenticated (RFC 8176).
    pub amr: &'a [String],
    /// The user's roles, for their lifetimes (`[tokens.roles]`).
    pub roles: &'a [String],
}

/// The `amr` value (RFC 8176) of a password.
pub const PASSWORD_AMR: &str = "pwd";

pub struct AuthService {
    pub store: Arc<dyn Store>,
    pub revocations: Arc<dyn Revocations>,
    pub tokens: AccessTokens,
    pub hasher: PasswordHasherPool,
    pub throttle: LoginThrottle,
    pub failures: Arc<dyn FailureBudgets>,
    /// What `GET /me` shows of users beyond their tokens, with when it was read (Unix
    /// seconds, and on this machine's monotonic clock).
    emails: Recent<UserId, (Profile, i64, std::time::Instant)>,
    pub outbox: Arc<Outbox>,
    /// Seals TOTP secrets and pending logins' device tokens (see [`super::mfa`]).
    pub(super) mfa_sealer: crate::seal::Sealer,
    pub(super) mail_throttle: MailThrottle,
    /// `{"role": seconds}` of `[tokens.roles]`, for the rotation's SQL.
    idle_by_role: String,
    absolute_by_role: String,
    settings: Settings,
    /// Login, refresh and revocation counts (see `crate::metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Who hears of which security events (see [`AuthService::record`]).
    webhooks: Arc<crate::outbox::webhook::Webhooks>,
}

impl From<HashError> for ApiError {
    fn from(err: HashError) -> Self {
        match err {
            HashError::Busy => {
                ApiError::Unavailable(anyhow::anyhow!("password hashing pool is full"), 1)
            }
            HashError::Failed(e) => ApiError::Internal(e),
        }
    }
}

impl AuthService {
    pub fn new(
        settings: Settings,
        store: Arc<dyn Store>,
        revocations: Arc<dyn Revocations>,
        failures: Arc<dyn FailureBudgets>,
        tokens: AccessTokens,
        hasher: PasswordHasherPool,
        sealing: Sealing,
    ) -> Self {
        let Sealing { outbox, mfa } = sealing;
        let throttle = LoginThrottle::new(&settings.login);
        let mail_throttle = MailThrottle::new(&settings);
        let emails = Recent::new(settings.cache.user_emails);
        AuthService {
            store,
            revocations,
            tokens,
            hasher,
            throttle,
            failures,
            emails,
            outbox,
            mfa_sealer: mfa,
            mail_throttle,
            idle_by_role: settings.tokens.by_role(|r| r.refresh_idle_ttl_secs),
            absolute_by_role: settings.tokens.by_role(|r| r.refresh_absolute_ttl_secs),
            settings,
            metrics: Default::default(),
            webhooks: Default::default(),
        }
    }

    /// Writes security events for `webhooks`' receivers beside their audit rows.
    pub fn with_webhooks(mut self, webhooks: Arc<crate::outbox::webhook::Webhooks>) -> Self {
        self.webhooks = webhooks;
        self
    }

    /// Counts into `metrics` (the server's, also given to the parts built before this).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// How long a session's denylist mark must live: until every access token issued
    /// under it has expired, leeway included.
    pub(super) fn access_token_horizon(&self) -> Duration {
        self.settings.tokens.access_token_horizon()
    }

    #[tracing::instrument(skip_all)]
    pub async fn register(
        &self,
        email: Email,
        password: Password,
        ip: IpAddr,
        client: &ClientInfo,
    ) -> Result<User, ApiError> {
        // Registration costs a hash too: it shares the per-IP login budget.
        self.throttle
            .check_ip(ip)
            .map_err(|t| ApiError::RateLimited(t.retry_after_secs))?;
        let hash = self.hasher.hash(password).await?;
        let link = self.registration_link(&email);
        let user = self
            .store
            .create_user(
                &email,
                &hash,
                &["user".to_owned()],
                link.as_ref().map(|l| l.grant()),
            )
            .await?;
        self.audit(
            AuditKind::UserCreated,
            Some(user.id),
            None,
            client,
            json!({"verification_sent": link.is_some()}),
        )
        .await;
        self.registration_link_sent(link.is_some(), user.id, client)
            .await;
        Ok(user)
    }

    /// Checks the password and starts a session. `device` is the client's device token,
    /// if it has one: valid for this account, it is counted in its own failure budget
    /// (see [`super::device`]) and handed back renewed; otherwise a new one is issued.
    #[tracing::instrument(skip_all)]
    pub async fn login(
        &self,
        request: LoginRequest,
        ip: IpAddr,
        client: &ClientInfo,
    ) -> Result<LoginOutcome, ApiError> {
        let LoginRequest {
            email,
            password,
            remember_me,
            device,
            cookie,
        } = request;
        let mut attempt = self
            .admit_password_attempt(&email, device, ip, client)
            .await?;
        let credentials = attempt.credentials.take();
        let hash = credentials.as_ref().map(|c| c.password_hash.clone());
        let verification = self
            .hasher
            .verify(attempt.take_slot(), password, hash)
            .await?;
        let (user, password_hash) = match credentials {
            Some(c) if verification.matches && !c.user.disabled => (c.user, c.password_hash),
            other => {
                attempt.finish(Outcome::Failed).await;
                let user_id = other.map(|c| c.user.id);
                self.audit(AuditKind::LoginFailed, user_id, None, client, json!({}))
                    .await;
                return Err(ApiError::InvalidCredentials);
            }
        };
        if self.settings.email.verification == EmailVerification::Required && !user.email_verified {
            // Only after the correct password: anyone else learns nothing from this.
            attempt.finish(Outcome::Succeeded).await;
            self.audit(
                AuditKind::LoginFailed,
                Some(user.id),
                None,
                client,
                json!({"reason": "email_not_verified"}),
            )
            .await;
            return Err(ApiError::EmailNotVerified);
        }

        let new_device = attempt.known_device.is_none();
        // A second factor: no session yet, only a challenge (see `super::mfa`).
        if let Some(mfa_token) = self
            .mfa_challenge(
                user.id,
                &password_hash,
                remember_me,
                cookie,
                attempt.known_device.as_ref(),
            )
            .await?
        {
            attempt.finish(Outcome::Succeeded).await;
            return Ok(LoginOutcome::MfaRequired { mfa_token });
        }
        let device = attempt
            .known_device
            .clone()
            .unwrap_or_else(DeviceToken::generate);
        let notice = match (&attempt.known_device, &user.email) {
            (None, Some(to)) => self.new_device_notice(user.id, to, client).await,
            _ => None,
        };
        let created = self
            .open_session(
                SessionStart {
                    user: user.id,
                    password_hash: &password_hash,
                    remember_me,
                    device: &device,
                    notice: notice.as_deref(),
                    amr: &[PASSWORD_AMR.to_owned()],
                    roles: &user.roles,
                },
                client,
            )
            .await?;
        let Some((created, refresh)) = created else {
            // The password changed or the user was disabled while we were hashing: the
            // password was not wrong, so nothing is counted.
            drop(attempt);
            self.audit(
                AuditKind::LoginFailed,
                Some(user.id),
                None,
                client,
                json!({}),
            )
            .await;
            return Err(ApiError::InvalidCredentials);
        };
        attempt.finish(Outcome::Succeeded).await;
        if notice.is_some() {
            self.outbox.wake();
        }
        self.deny_sessions(&created.evicted).await?;
        if let Some(new_hash) = verification.upgraded_hash {
            self.upgrade_hash(user.id, &password_hash, &new_hash).await;
        }
        self.audit(
            AuditKind::LoginSucceeded,
            Some(user.id),
            Some(created.grant.session_id),
            client,
            json!({
                "remember_me": remember_me,
                "sessions_evicted": created.evicted.len(),
                "new_device": new_device,
            }),
        )
        .await;
        let mut grant = self.token_grant(&created.grant, refresh)?;
        grant.device_token = Some(device);
        Ok(LoginOutcome::Tokens(grant))
    }

    #[tracing::instrument(skip_all)]
    pub async fn refresh(
        &self,
        presented: &str,
        client: &ClientInfo,
    ) -> Result<TokenGrant, ApiError> {
        let result = self.rotate_or_refuse(presented, client).await;
        self.metrics.refresh(match &result {
            Ok((_, how)) => how,
            Err(ApiError::InvalidGrant(reason)) => reason.as_str(),
            Err(_) => "error",
        });
        result.map(|(grant, _)| grant)
    }

    /// A refresh, with how it was answered: "rotated", or "grace" (the successor a
    /// concurrent or retried presentation already got).
    async fn rotate_or_refuse(
        &self,
        presented: &str,
        client: &ClientInfo,
    ) -> Result<(TokenGrant, &'static str), ApiError> {
        let Some(token) = RefreshToken::parse(presented) else {
            return Err(ApiError::InvalidGrant(GrantFailure::Unknown));
        };
        let token_hash = token.hash();
        let successor = token.successor();
        let rotation = Rotation {
            token_hash: &token_hash,
            successor_hash: &successor.hash(),
            successor_sealed: &token.seal_successor(&successor),
            idle_ttl_secs: self.settings.tokens.refresh_idle_ttl_secs as i64,
            grace_secs: self.settings.tokens.refresh_reuse_grace_secs as i64,
            audit: self.settings.audit.refresh,
            bind_user_agent: self.settings.sessions.bind_user_agent,
            idle_by_role: &self.idle_by_role,
            absolute_by_role: &self.absolute_by_role,
            client,
        };
        if let Some(grant) = self.store.rotate_refresh(rotation).await? {
            return Ok((self.token_grant(&grant, successor)?, "rotated"));
        }

        // Not rotated: find out why.
        let Some((state, superseded)) = self.presented_state(&token, &token_hash).await? else {
            return Err(ApiError::InvalidGrant(GrantFailure::Unknown));
        };
        let t = &self.settings.tokens;
        if let Some(revoked_at) = state.revoked_at {
            // If the denylist write that went with the revocation failed (Redis down),
            // this is the chance to repair it while its access tokens may still live.
            if state.now - revoked_at
                < chrono::Duration::from_std(self.access_token_horizon()).unwrap_or_default()
                && let Err(e) = self
                    .revocations
                    .revoke_sessions(&[state.grant.session_id], self.access_token_horizon())
                    .await
            {
                tracing::warn!(error = %e, "could not re-mark a revoked session");
            }
        }
        if let Some(reason) = self.ended(&state) {
            return Err(ApiError::InvalidGrant(reason));
        }
        if self.settings.sessions.bind_user_agent && state.login_user_agent != client.user_agent {
            // Another client than the login's: possible theft, so the session ends.
            let sid = state.grant.session_id;
            self.store
                .revoke_session(sid, "client_changed", None)
                .await?;
            self.deny_sessions(&[sid]).await?;
            self.audit(
                AuditKind::SessionClientChanged,
                Some(state.grant.user_id),
                Some(sid),
                client,
                json!({}),
            )
            .await;
            return Err(ApiError::InvalidGrant(GrantFailure::ClientChanged));
        }
        let rotated_at = match (state.rotated_at, superseded) {
            (Some(at), _) => Some(at),
            // Older than every token the session keeps: rotated long ago.
            (None, true) => None,
            // The session changed between the two statements (e.g. it expired at that
            // very moment); nothing was rotated, so the client may simply retry.
            (None, false) => return Err(ApiError::InvalidGrant(GrantFailure::Unknown)),
        };
        let grace = chrono::Duration::seconds(t.refresh_reuse_grace_secs as i64);
        if let Some(rotated_at) = rotated_at
            && t.refresh_reuse_grace_secs > 0
            && state.now - rotated_at <= grace
        {
            // A concurrent caller or a retry: hand out the successor the first caller got.
            if let Some(same) = state
                .successor_sealed
                .as_deref()
                .and_then(|s| token.open_successor(s))
            {
                return Ok((self.token_grant(&state.grant, same)?, "grace"));
            }
        }

        // Reuse after the window: treat as theft and end the whole session.
        let sid = state.grant.session_id;
        tracing::warn!(session_id = %sid, "refresh token reuse detected; revoking session");
        let notice = self.notice_for(NoticeKind::SessionReuseDetected);
        let noticed = notice.is_some();
        if self
            .store
            .revoke_session(sid, "refresh_token_reuse", notice)
            .await?
            .is_some()
            && noticed
        {
            self.outbox.wake();
        }
        self.deny_sessions(&[sid]).await?;
        self.audit(
            AuditKind::RefreshReuseDetected,
            Some(state.grant.user_id),
            Some(sid),
            client,
            json!({}),
        )
        .await;
        Err(ApiError::InvalidGrant(GrantFailure::Reused))
    }

    /// What the store knows of a presented refresh token that did not rotate: its row,
    /// or, for a chain token whose row the rotations have deleted, its session, with
    /// `true` (superseded) when the token is of an earlier generation than the
    /// session's current one. `None`: unknown (or a forged chain token).
    async fn presented_state(
        &self,
        token: &RefreshToken,
        token_hash: &[u8],
    ) -> Result<Option<(RefreshState, bool)>, ApiError> {
        if let Some(state) = self.store.refresh_state(token_hash).await? {
            return Ok(Some((state, false)));
        }
        let Some(chain) = token.chain() else {
            return Ok(None);
        };
        let found = self
            .store
            .chain_state(chain.session, &chain.secret_hash())
            .await?;
        Ok(found
            .filter(|(_, current)| (chain.generation as i64) < *current)
            .map(|(state, _)| (state, true)))
    }

    /// Verifies an access token and checks the revocation marks.
    pub async fn authenticate(&self, bearer: &str) -> Result<Claims, ApiError> {
        let claims = self.tokens.verify(bearer).map_err(|e| {
            tracing::debug!(error = %e, "access token refused");
            ApiError::InvalidToken
        })?;
        let revoked = self
            .revocations
            .is_revoked(claims.sid, &claims.jti, claims.sub, claims.issued_at_ms())
            .await
            .map_err(ApiError::unavailable)?;
        if revoked {
            return Err(ApiError::InvalidToken);
        }
        Ok(claims)
    }

    /// Ends the caller's session (`sid`, of `user`), the user's other sessions, or all
    /// of them; returns the sessions ended.
    #[tracing::instrument(skip_all, fields(session_id = %sid))]
    pub async fn logout(
        &self,
        sid: SessionId,
        user: UserId,
        scope: LogoutScope,
        client: &ClientInfo,
    ) -> Result<Vec<SessionId>, ApiError> {
        let recent = self.access_token_horizon().as_secs() as i64;
        let ended = match scope {
            // Even if it was already ended in the database, make sure of the mark.
            LogoutScope::Local => {
                self.store.revoke_session(sid, "logout", None).await?;
                vec![sid]
            }
            LogoutScope::Others => {
                self.store
                    .revoke_user_sessions(user, Some(sid), "logout_others", recent)
                    .await?
            }
            LogoutScope::Global => {
                let mut ended = self
                    .store
                    .revoke_user_sessions(user, None, "logout_global", recent)
                    .await?;
                if !ended.contains(&sid) {
                    ended.push(sid);
                }
                ended
            }
        };
        self.deny_sessions(&ended).await?;
        let scope_name = format!("{scope:?}").to_lowercase();
        self.audit(
            AuditKind::Logout,
            Some(user),
            Some(sid),
            client,
            json!({"scope": scope_name, "sessions_ended": ended.len()}),
        )
        .await;
        Ok(ended)
    }

    /// The session a refresh token (a browser's cookie) belongs to, and whether it is
    /// live with this token: not ended, not expired, and the token its current one or
    /// rotated within the grace window. `None`: the token names no session.
    pub async fn session_of(
        &self,
        presented: &str,
    ) -> Result<Option<(SessionId, UserId, bool)>, ApiError> {
        let Some(token) = RefreshToken::parse(presented) else {
            return Ok(None);
        };
        let Some((state, superseded)) = self.presented_state(&token, &token.hash()).await? else {
            return Ok(None);
        };
        let grace = chrono::Duration::seconds(self.settings.tokens.refresh_reuse_grace_secs as i64);
        let current = match state.rotated_at {
            None => !superseded,
            Some(at) => state.now - at <= grace,
        };
        let live = current && self.ended(&state).is_none();
        Ok(Some((state.grant.session_id, state.grant.user_id, live)))
    }

    /// Why a session is over, if it is: revoked (or its user disabled), past its
    /// absolute end, or idle too long.
    /// The lifetimes are the user's roles' now (`[tokens.roles]`), so a role change
    /// applies at the next refresh.
    fn ended(&self, state: &RefreshState) -> Option<GrantFailure> {
        let g = &state.grant;
        let lifetimes = self.settings.tokens.lifetimes_for(&g.roles, g.remember_me);
        let idle = chrono::Duration::seconds(lifetimes.refresh_idle_ttl_secs as i64);
        let absolute = chrono::Duration::seconds(lifetimes.refresh_absolute_ttl_secs as i64);
        if state.revoked_at.is_some() || state.disabled {
            Some(GrantFailure::Revoked)
        } else if state.now >= g.expires_at || state.now >= state.created_at + absolute {
            Some(GrantFailure::Expired)
        } else if state.now >= state.last_used_at + idle {
            Some(GrantFailure::IdleExpired)
        } else {
            None
        }
    }

    /// RFC 7009: a refresh token ends its session; an access token is revoked by `jti`.
    /// Unknown, malformed or expired tokens are silently accepted. The two token formats
    /// cannot be confused, so `token_type_hint` is not needed.
    #[tracing::instrument(skip_all)]
    pub async fn revoke(&self, token: &str, client: &ClientInfo) -> Result<(), ApiError> {
        // A repeat revocation is a no-op: it writes no row, no mark and no audit event
        // (only a missing mark is repaired), so anyone holding an old token cannot turn
        // /revoke into a stream of writes and publications.
        if let Some(refresh) = RefreshToken::parse(token) {
            let Some((state, _)) = self.presented_state(&refresh, &refresh.hash()).await? else {
                return Ok(());
            };
            let sid = state.grant.session_id;
            let horizon = self.access_token_horizon();
            if let Some(revoked_at) = state.revoked_at {
                let since = (state.now - revoked_at).to_std().unwrap_or_default();
                if since < horizon {
                    self.revocations
                        .ensure_session_revoked(sid, horizon - since)
                        .await
                        .map_err(ApiError::unavailable)?;
                }
                return Ok(());
            }
            let ended_now = self
                .store
                .revoke_session(sid, "revoked", None)
                .await?
                .is_some();
            self.deny_sessions(&[sid]).await?;
            if ended_now {
                self.audit(
                    AuditKind::Revoke,
                    Some(state.grant.user_id),
                    Some(sid),
                    client,
                    json!({"token_type": "refresh_token"}),
                )
                .await;
            }
            return Ok(());
        }
        if let Ok(claims) = self.tokens.verify(token) {
            let remaining =
                claims.exp - Utc::now().timestamp() + self.settings.tokens.leeway_secs as i64;
            if remaining > 0
                && self
                    .revocations
                    .revoke_token(&claims.jti, Duration::from_secs(remaining as u64))
                    .await
                    .map_err(ApiError::unavailable)?
            {
                self.metrics.revoked("token", 1);
                self.audit(
                    AuditKind::Revoke,
                    Some(claims.sub),
                    Some(claims.sid),
                    client,
                    json!({"token_type": "access_token"}),
                )
                .await;
            }
        }
        Ok(())
    }

    /// RFC 7662: the claims of an active access token, `None` for anything else.
    pub async fn introspect(&self, token: &str) -> Result<Option<Claims>, ApiError> {
        match self.authenticate(token).await {
            Ok(claims) => Ok(Some(claims)),
            Err(ApiError::InvalidToken) => Ok(None),
            Err(other) => Err(other),
        }
    }

    pub async fn current_user(&self, id: UserId) -> Result<User, ApiError> {
        match self.store.find_user(id).await? {
            Some(user) if !user.disabled => Ok(user),
            _ => Err(ApiError::InvalidToken),
        }
    }

    /// What `GET /me` shows beyond the token's claims (the email, whether it is
    /// verified, whether a second factor is on): from memory, or from the database on a
    /// miss, which also turns away a disabled or unknown user.
    ///
    /// A remembered entry is used only for a token issued well before it was read
    /// (`EMAIL_FRESH_MARGIN_SECS`). An email change, a deletion, and turning a second
    /// factor on or off revoke every access token of the user issued up to their commit,
    /// so any token still accepted was issued after it; an entry read before the change
    /// is therefore older than the token and is read again, on every instance, without
    /// telling them. A token's first `GET /me` on an instance reads the database once;
    /// later ones are served from memory. Verification revokes nothing, but it only ever
    /// turns `false` into `true` for a given address: so an entry saying "verified"
    /// stays right. One saying "not verified" (or, for an anonymous user, "no address")
    /// is used for at most `UNSETTLED_PROFILE_SECS` after it was read, and the instance
    /// that verifies an address forgets it at once: another instance may say "not
    /// verified" for up to that long after a verification. Without this, a user who
    /// never verifies (the default, `email.verification = "off"`) cost two database
    /// reads per `GET /me`. Whatever else decides whether the caller may see it is in
    /// the token, which the denylist has just checked: disabling a user revokes all
    /// their tokens.
    pub async fn profile_of(&self, user: UserId, token_iat: i64) -> Result<Profile, ApiError> {
        if let Some((profile, read_at, read)) = self.emails.get(&user)
            && read_at >= token_iat + EMAIL_FRESH_MARGIN_SECS
            && ((profile.email.is_some() && profile.email_verified)
                || read.elapsed() < UNSETTLED_PROFILE_SECS)
        {
            return Ok(profile);
        }
        let (read_at, read) = (Utc::now().timestamp(), std::time::Instant::now());
        let user = self.current_user(user).await?;
        let profile = Profile {
            mfa: self.store.totp(user.id).await?.is_some_and(|t| t.confirmed),
            email: user.email.map(Into::into),
            email_verified: user.email_verified,
        };
        self.emails
            .insert(user.id, (profile.clone(), read_at, read));
        Ok(profile)
    }

    /// Drops a remembered email (this instance's; others go by the rule of
    /// [`AuthService::profile_of`]).
    pub(super) fn forget_email(&self, user: UserId) {
        self.emails.remove(&user);
    }

    pub(super) async fn deny_sessions(&self, sids: &[SessionId]) -> Result<(), ApiError> {
        self.revocations
            .revoke_sessions(sids, self.access_token_horizon())
            .await
            .map_err(ApiError::unavailable)?;
        self.metrics.revoked("session", sids.len());
        Ok(())
    }

    pub(super) fn token_grant(
        &self,
        grant: &Grant,
        refresh: RefreshToken,
    ) -> Result<TokenGrant, ApiError> {
        let access_token = self.tokens.issue(grant).map_err(ApiError::Internal)?;
        let remaining = (grant.expires_at - Utc::now()).num_seconds().max(0);
        let lifetimes = self
            .settings
            .tokens
            .lifetimes_for(&grant.roles, grant.remember_me);
        let idle = lifetimes.refresh_idle_ttl_secs as i64;
        Ok(TokenGrant {
            access_token,
            expires_in: lifetimes.access_ttl_secs as i64,
            refresh_token: refresh,
            refresh_token_expires_in: remaining.min(idle),
            session_id: grant.session_id,
            session_expires_in: remaining,
            remember_me: grant.remember_me,
            device_token: None,
        })
    }

    /// Starts a session with its first refresh token (see [`SessionStart`]); `None` when
    /// the user no longer has the hash or was disabled meanwhile.
    pub(super) async fn open_session(
        &self,
        start: SessionStart<'_>,
        client: &ClientInfo,
    ) -> Result<Option<(CreatedSession, RefreshToken)>, ApiError> {
        let SessionStart {
            user,
            password_hash,
            remember_me,
            device,
            notice,
            amr,
            roles,
        } = start;
        let lifetime = self
            .settings
            .tokens
            .lifetimes_for(roles, remember_me)
            .refresh_absolute_ttl_secs;
        let session_id = SessionId(uuid::Uuid::new_v4());
        let expires_at = Utc::now() + chrono::Duration::seconds(lifetime as i64);
        let (refresh, chain_hash) = RefreshToken::start_chain_hashed(session_id);
        let created = self
            .store
            .create_session(NewSession {
                id: session_id,
                user_id: user,
                remember_me,
                expires_at,
                refresh_hash: &refresh.hash(),
                password_hash,
                client,
                max_per_user: self.settings.sessions.max_per_user,
                recent_secs: self.access_token_horizon().as_secs() as i64,
                device_hash: &device.hash(),
                device_ttl_secs: self.settings.login.device_ttl_secs as i64,
                chain_hash: &chain_hash,
                notice,
                amr,
            })
            .await?;
        Ok(created.map(|c| (c, refresh)))
    }

    /// Replaces a hash made with outdated parameters; best effort, like audit rows.
    async fn upgrade_hash(&self, user: UserId, old: &str, new: &str) {
        match self.store.replace_password_hash(user, old, new).await {
            Ok(()) => {
                tracing::info!(user_id = %user, "password hash upgraded to current parameters")
            }
            Err(e) => tracing::warn!(error = %e, "password hash upgrade failed"),
        }
    }

    /// Audit rows are best effort: a failure is logged, never shown to the client.
    pub(super) async fn audit(
        &self,
        kind: AuditKind,
        user_id: Option<UserId>,
        session_id: Option<SessionId>,
        client: &ClientInfo,
        detail: serde_json::Value,
    ) {
        self.record(AuditEvent {
            kind,
            user_id,
            session_id,
            actor_id: None,
            client,
            detail,
        })
        .await
    }

    /// Writes an audit row; when it reports a security event that webhook receivers
    /// subscribed to, their outbox rows go in the same transaction and the sender is
    /// woken (see `crate::outbox::webhook`).
    pub(super) async fn record(&self, event: AuditEvent<'_>) {
        let kind = event.kind;
        let webhooks = self.webhooks.rows(&self.outbox, &event);
        let written = match webhooks.is_empty() {
            true => self.store.record_audit(event).await,
            false => {
                let written = self.store.record_event(event, webhooks).await;
                if written.is_ok() {
                    self.outbox.wake();
                }
                written
            }
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, kind = kind.as_str(), "audit write failed");
        }
    }
}
