//! What an admin can do to other users: list and end their sessions, disable them or
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
use super::session::AuthService;
use crate::domain::UserId;
use crate::error::ApiError;
use crate::store::{
    AuditEvent, AuditKind, AuditQuery, AuditRecord, ClientInfo, SessionInfo, User, UserChange,
};

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
        self.existing_user(user).await?;
        let idle = self.settings().tokens.refresh_idle_ttl_secs as i64;
        Ok(self.store.list_sessions(user, idle).await?)
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
            .map_err(ApiError::unavailable)
    }

    /// Deletes a user as `DELETE /me` does (409 for the last enabled admin).
    #[tracing::instrument(skip_all, fields(user_id = %user))]
    pub async fn admin_delete_user(
        &self,
        admin: &Claims,
        user: UserId,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        self.delete_user(user, Some((admin, client))).await
    }

    async fn admin_audit(
        &self,
        kind: AuditKind,
        admin: &Claims,
        user: UserId,
        client: &ClientInfo,
        detail: serde_json::Value,
    ) {
        self.record(AuditEvent {
            kind,
            user_id: Some(user),
            session_id: Some(admin.sid),
            actor_id: Some(admin.sub),
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
