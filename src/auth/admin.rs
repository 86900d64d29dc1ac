//! What an admin can do to other users: list, create (with an invitation), show and
//! delete them, send them a reset link, list and end their sessions, disable them or
//! change their roles, and read the audit trail.
//!
//! Ending a user's sessions, disabling them and changing their roles all revoke the
//! user's existing access tokens with one per-user mark, `revoked:user:<id>` = the
//! database's clock after the change committed (see [`crate::store::redis::denylist`]), and
//! the sessions they end (disabling, ending all) also get their own `sid` marks, one
//! pipelined write before it. Tokens issued afterwards (the next refresh, which carries the new roles) are
//! unaffected; tokens whose granting statement ran before the change, however late
//! they were signed, are covered, since their issue time is that statement's clock.

use serde_json::json;

use super::access_token::Claims;
use super::refresh_token::RefreshToken;
use super::session::AuthService;
use crate::domain::{Email, Password, UserId};
use crate::email::templates::Template;
use crate::error::ApiError;
use crate::store::{
    AuditEvent, AuditKind, AuditQuery, AuditRecord, ClientInfo, EmailTokenKind, SessionInfo, User,
    UserChange,
};

/// Who acts on a user's account, as the audit trail records it.
#[derive(Clone, Copy)]
pub enum By<'a> {
    /// The user themself (no address or user agent is kept for a deletion).
    Owner,
    /// An admin through the HTTP API.
    Admin(&'a Claims, &'a ClientInfo),
    /// An operator through the `tessera` command line.
    Operator,
    /// The periodic cleanup (anonymous users never converted).
    Cleanup,
}

/// Role names: short, printable, no spaces (they travel in every access token).
pub fn parse_roles(raw: Vec<String>) -> Result<Vec<String>, &'static str> {
    if raw.len() > 32 {
        return Err("at most 32 roles");
    }
    let ok = |r: &String| {
        (1..=64).contains(&r.len())
            && r.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
    };
    if !raw.iter().all(ok) {
        return Err("roles must be 1 to 64 characters of a-z, A-Z, 0-9, _ - . :");
    }
    let mut roles = raw;
    roles.sort();
    roles.dedup();
    Ok(roles)
}

impl AuthService {
    pub async fn admin_user_sessions(&self, user: UserId) -> Result<Vec<SessionInfo>, ApiError> {
        let user = self.existing_user(user).await?;
        let idle = self.settings().tokens.refresh_idle_ttl_secs as i64;
        let sessions = self.store.list_sessions(user.id, idle).await?;
        Ok(self.under_role_lifetimes(sessions, &user.roles))
    }

    #[tracing::instrument(skip_all, fields(user_id = %user))]
    pub async fn admin_end_sessions(
        &self,
        admin: &Claims,
        user: UserId,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        self.existing_user(user).await?;
        // Sessions ended recently are returned too, so a retry after a failed Redis
        // write marks them all again.
        let recent = self.access_token_horizon().as_secs() as i64;
        let ended = self
            .store
            .revoke_user_sessions(user, None, "ended_by_admin", recent)
            .await?;
        self.deny_sessions(&ended).await?;
        self.revoke_user_tokens(user).await?;
        self.admin_audit(
            AuditKind::AdminSessionsEnded,
            admin,
            user,
            client,
            json!({"sessions_ended": ended.len()}),
        )
        .await;
        Ok(())
    }

    /// Disables/enables a user or replaces their roles. Disabling ends every session;
    /// disabling or a role change revokes every access token issued so far.
    #[tracing::instrument(skip_all, fields(user_id = %user))]
    pub async fn admin_update_user(
        &self,
        admin: &Claims,
        user: UserId,
        change: UserChange,
        client: &ClientInfo,
    ) -> Result<User, ApiError> {
        let update = self
            .store
            .update_user(user, &change)
            .await?
            .ok_or(ApiError::NotFound)?;
        // Any PATCH naming roles marks, changed or not: when the first attempt changed
        // them and then failed to reach Redis (503), the retry must still write the mark.
        if update.user.disabled || change.roles.is_some() {
            self.deny_sessions(&update.ended).await?;
            self.revoke_user_tokens(user).await?;
        }
        self.admin_audit(
            AuditKind::AdminUserUpdated,
            admin,
            user,
            client,
            json!({
                "disabled": change.disabled,
                "roles": change.roles,
                "roles_changed": update.roles_changed,
                "sessions_ended": update.ended.len(),
            }),
        )
        .await;
        Ok(update.user)
    }

    pub async fn audit_log(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, ApiError> {
        Ok(self.store.list_audit(query).await?)
    }

    async fn existing_user(&self, user: UserId) -> Result<User, ApiError> {
        self.store.find_user(user).await?.ok_or(ApiError::NotFound)
    }

    /// Every access token of `user` issued up to now stops working on every instance.
    /// "Now" is the database's clock read after the change committed, the clock every
    /// token's issue time comes from: a login or refresh whose statement did not see the
    /// change began before this read, so its token is covered (see `Store::clock`).
    pub(super) async fn revoke_user_tokens(&self, user: UserId) -> Result<(), ApiError> {
        let now = self.store.clock().await?;
        self.revocations
            .revoke_user_tokens(user, now.timestamp_millis(), self.access_token_horizon())
            .await
            .map_err(ApiError::unavailable)?;
        self.metrics.revoked("user", 1);
        Ok(())
    }

    /// Deletes a user as `DELETE /me` does (409 for the last enabled admin).
    #[tracing::instrument(skip_all, fields(user_id = %user))]
    pub async fn admin_delete_user(
        &self,
        admin: &Claims,
        user: UserId,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        self.delete_user(user, By::Admin(admin, client)).await
    }

    /// Users sorted by email (see `GET /admin/users`).
    pub async fn admin_list_users(
        &self,
        prefix: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<User>, ApiError> {
        let fold = |s: &str| {
            use unicode_normalization::UnicodeNormalization;
            s.trim()
                .nfkc()
                .collect::<String>()
                .to_lowercase()
                .nfc()
                .collect::<String>()
        };
        let (prefix, after) = (prefix.map(fold), after.map(fold));
        Ok(self
            .store
            .list_users(prefix.as_deref(), after.as_deref(), limit)
            .await?)
    }

    /// A user by id, if there is one (`tessera user show`).
    pub async fn find_user(&self, id: UserId) -> Result<Option<User>, ApiError> {
        Ok(self.store.find_user(id).await?)
    }

    /// A user by email, if there is one (`tessera user show`).
    pub async fn find_user_by_email(&self, email: &Email) -> Result<Option<User>, ApiError> {
        Ok(self
            .store
            .find_credentials(email, None)
            .await?
            .map(|c| c.user))
    }

    pub async fn admin_get_user(&self, user: UserId) -> Result<User, ApiError> {
        self.existing_user(user).await
    }

    /// Creates a user (`POST /admin/users`): with a password, ready to log in; without,
    /// with a password nobody knows and an invitation (a reset link that lives
    /// `email.invite_ttl_secs`) emailed in the same transaction.
    pub async fn admin_create_user(
        &self,
        admin: &Claims,
        email: Email,
        roles: Vec<String>,
        password: Option<Password>,
        client: &ClientInfo,
    ) -> Result<User, ApiError> {
        let invite = password.is_none();
        let password = match password {
            Some(p) => p,
            None => Password::parse_new(RefreshToken::generate().expose().to_owned())
                .map_err(|e| ApiError::Internal(anyhow::anyhow!("random password: {e}")))?,
        };
        let hash = self.hasher.hash(password).await?;
        let link = invite.then(|| {
            self.issue_link(
                EmailTokenKind::ResetPassword,
                Template::Invitation,
                None,
                &email,
                self.settings().email.invite_ttl_secs,
            )
        });
        let user = self
            .store
            .create_user(&email, &hash, &roles, link.as_ref().map(|l| l.grant()))
            .await?;
        if link.is_some() {
            self.outbox.wake();
        }
        self.admin_audit(
            AuditKind::UserCreated,
            admin,
            user.id,
            client,
            json!({"roles": roles}),
        )
        .await;
        if invite {
            self.admin_audit(AuditKind::InvitationSent, admin, user.id, client, json!({}))
                .await;
        }
        Ok(user)
    }

    /// Emails `user` a password reset link (`POST /admin/users/{id}/password-reset`).
    pub async fn admin_send_reset(
        &self,
        admin: &Claims,
        user: UserId,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        self.send_reset(user, By::Admin(admin, client)).await
    }

    /// Emails `user` a password reset link (`POST /admin/users/{id}/password-reset`,
    /// `tessera user reset`).
    pub async fn send_reset(&self, user: UserId, by: By<'_>) -> Result<(), ApiError> {
        let user = self.existing_user(user).await?;
        let email = user.address().ok_or_else(|| {
            ApiError::InvalidRequest("this user is anonymous: it has no address to send to".into())
        })?;
        let link = self.issue_link(
            EmailTokenKind::ResetPassword,
            Template::ResetPassword,
            Some(user.id),
            &email,
            self.settings().email.reset_ttl_secs,
        );
        if !self.store.issue_email_token(user.id, link.grant()).await? {
            return Err(ApiError::NotFound);
        }
        self.outbox.wake();
        self.audit_by(by, AuditKind::PasswordResetRequested, user.id, json!({}))
            .await;
        Ok(())
    }

    async fn admin_audit(
        &self,
        kind: AuditKind,
        admin: &Claims,
        user: UserId,
        client: &ClientInfo,
        detail: serde_json::Value,
    ) {
        self.audit_by(By::Admin(admin, client), kind, user, detail)
            .await
    }

    /// An audit row of something done to `user`: by an admin, with their id, session
    /// and client; by an operator, marked so in `detail`; by the user, with no address
    /// or user agent.
    pub(super) async fn audit_by(
        &self,
        by: By<'_>,
        kind: AuditKind,
        user: UserId,
        mut detail: serde_json::Value,
    ) {
        let none = ClientInfo::default();
        let (session_id, actor_id, client) = match by {
            By::Admin(admin, client) => (Some(admin.sid), Some(admin.sub), client),
            By::Operator => {
                detail["by"] = json!("operator");
                (None, None, &none)
            }
            By::Cleanup => {
                detail["by"] = json!("cleanup");
                (None, None, &none)
            }
            By::Owner => (None, None, &none),
        };
        self.record(AuditEvent {
            kind,
            user_id: Some(user),
            session_id,
            actor_id,
            client,
            detail,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_checked_sorted_and_deduplicated() {
        let roles = |v: &[&str]| parse_roles(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(roles(&["b", "a", "b"]).unwrap(), ["a", "b"]);
        assert_eq!(roles(&[]).unwrap(), Vec::<String>::new());
        assert!(roles(&["ok:scope.read-1_x"]).is_ok());
        assert!(roles(&[""]).is_err());
        assert!(roles(&["has space"]).is_err());
        assert!(roles(&[&"x".repeat(65)]).is_err());
        let many: Vec<String> = (0..33).map(|i| format!("r{i}")).collect();
        assert!(parse_roles(many).is_err());
    }
}
