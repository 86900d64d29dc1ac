//! What a signed-in user can do about their own account: see and end their sessions,
//! and change their password (which ends every other session at once).

use super::admin::By;
use crate::config::NoticeKind;
use std::net::IpAddr;

use serde_json::json;

use super::access_token::Claims;
use super::device::DeviceToken;
use super::session::AuthService;
use crate::domain::{Password, SessionId, UserId};
use crate::error::ApiError;
use crate::store::Outcome;
use crate::store::{AuditKind, ClientInfo, Credentials, SessionInfo};

impl AuthService {
    /// The caller's live sessions, most recently used first.
    pub async fn sessions(&self, claims: &Claims) -> Result<Vec<SessionInfo>, ApiError> {
        let idle = self.settings().tokens.refresh_idle_ttl_secs as i64;
        let sessions = self.store.list_sessions(claims.sub, idle).await?;
        Ok(self.under_role_lifetimes(sessions, &claims.roles))
    }

    /// Sessions as the lifetimes of a user holding `roles` see them (`[tokens.roles]`):
    /// those that have ended by them left out, the others' `expires_at` brought in.
    pub(super) fn under_role_lifetimes(
        &self,
        sessions: Vec<SessionInfo>,
        roles: &[String],
    ) -> Vec<SessionInfo> {
        let tokens = &self.settings().tokens;
        if tokens.roles.is_empty() {
            return sessions;
        }
        let now = chrono::Utc::now();
        sessions
            .into_iter()
            .filter_map(|mut s| {
                let l = tokens.lifetimes_for(roles, s.remember_me);
                let secs = |n: u64| chrono::Duration::seconds(n as i64);
                s.expires_at = s
                    .expires_at
                    .min(s.last_used_at + secs(l.refresh_idle_ttl_secs))
                    .min(s.created_at + secs(l.refresh_absolute_ttl_secs));
                (s.expires_at > now).then_some(s)
            })
            .collect()
    }

    /// Ends one of the caller's own sessions: its refresh token at once and its access
    /// tokens on every instance. Anyone else's session id is `NotFound`, exactly like an
    /// id that does not exist.
    #[tracing::instrument(skip_all, fields(session_id = %id))]
    pub async fn end_own_session(
        &self,
        claims: &Claims,
        id: SessionId,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        let recent = self.access_token_horizon().as_secs() as i64;
        if !self
            .store
            .revoke_own_session(claims.sub, id, "ended_by_user", recent)
            .await?
        {
            return Err(ApiError::NotFound);
        }
        self.deny_sessions(&[id]).await?;
        self.audit(
            AuditKind::SessionEnded,
            Some(claims.sub),
            Some(id),
            client,
            json!({"by_session": claims.sid}),
        )
        .await;
        Ok(())
    }

    /// Changes the caller's password after checking the current one, under the same
    /// throttling as login (a stolen access token must not become a password oracle),
    /// with the caller's device token counted like a login's.
    /// Every other session ends at once; the caller's own session goes on.
    ///
    /// The database change comes first; if the denylist write then fails the caller gets
    /// 503, the new password is in force and the other sessions cannot refresh, but their
    /// access tokens live until they expire unless `POST /logout {"scope":"others"}`
    /// (which re-marks recently ended sessions) succeeds.
    #[tracing::instrument(skip_all, fields(user_id = %claims.sub))]
    pub async fn change_password(
        &self,
        claims: &Claims,
        current: Password,
        new: Password,
        device: Option<DeviceToken>,
        ip: IpAddr,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        self.require_recent_auth(claims)?;
        let credentials = self
            .check_own_password(
                claims,
                current,
                device,
                ip,
                client,
                AuditKind::PasswordChangeFailed,
            )
            .await?;
        let new_hash = self.hasher.hash(new).await?;
        let notice = credentials
            .user
            .email
            .as_deref()
            .and_then(|to| self.notice(NoticeKind::PasswordChanged, claims.sub, to, &[]));
        let ended = self
            .store
            .change_password(
                claims.sub,
                &credentials.password_hash,
                &new_hash,
                claims.sid,
                notice.as_deref(),
            )
            .await?
            // Changed or disabled by someone else meanwhile.
            .ok_or(ApiError::InvalidCredentials)?;
        if notice.is_some() {
            self.outbox.wake();
        }
        self.deny_sessions(&ended).await?;
        self.audit(
            AuditKind::PasswordChanged,
            Some(claims.sub),
            Some(claims.sid),
            client,
            json!({"sessions_ended": ended.len()}),
        )
        .await;
        Ok(())
    }

    /// Checks the caller's own password under the same throttling as login (a stolen
    /// access token must not become a password oracle), with the caller's device token
    /// counted like a login's. A wrong password is audited as `failed` and answers
    /// `invalid_credentials`. The caller's credentials as stored.
    pub(super) async fn check_own_password(
        &self,
        claims: &Claims,
        password: Password,
        device: Option<DeviceToken>,
        ip: IpAddr,
        client: &ClientInfo,
        failed: AuditKind,
    ) -> Result<Credentials, ApiError> {
        let user = self.current_user(claims.sub).await?;
        // An anonymous user has no email, and no password to check.
        let email = user.address().ok_or(ApiError::InvalidCredentials)?;
        let mut attempt = self
            .admit_password_attempt(&email, device, ip, client)
            .await?;
        let credentials = attempt
            .credentials
            .take()
            .filter(|c| c.user.id == claims.sub)
            .ok_or(ApiError::InvalidToken)?;
        let verification = self
            .hasher
            .verify(
                attempt.take_slot(),
                password,
                Some(credentials.password_hash.clone()),
            )
            .await?;
        if !verification.matches {
            attempt.finish(Outcome::Failed).await;
            self.audit(
                failed,
                Some(claims.sub),
                Some(claims.sid),
                client,
                json!({}),
            )
            .await;
            return Err(ApiError::InvalidCredentials);
        }
        attempt.finish(Outcome::Succeeded).await;
        Ok(credentials)
    }

    /// Deletes the caller's account after checking their password (`DELETE /me`):
    /// everything of theirs goes in one transaction, and every access token of theirs
    /// fails at once on every instance (one per-user mark). The audit row it leaves names
    /// only the user id.
    #[tracing::instrument(skip_all, fields(user_id = %claims.sub))]
    pub async fn delete_own_account(
        &self,
        claims: &Claims,
        password: Password,
        device: Option<DeviceToken>,
        ip: IpAddr,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        self.check_own_password(
            claims,
            password,
            device,
            ip,
            client,
            AuditKind::UserDeletionFailed,
        )
        .await?;
        self.delete_user(claims.sub, By::Owner).await
    }

    /// Deletes `user` (the caller's own account, by an admin or by an operator); see
    /// [`AuthService::delete_own_account`].
    pub async fn delete_user(&self, user: UserId, by: By<'_>) -> Result<(), ApiError> {
        if !self.store.delete_user(user).await? {
            return Err(ApiError::NotFound);
        }
        self.forget_email(user);
        self.revoke_user_tokens(user).await?;
        self.audit_by(by, AuditKind::UserDeleted, user, json!({}))
            .await;
        Ok(())
    }
}
