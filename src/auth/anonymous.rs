//! Anonymous users (`registration.anonymous`): `POST /users/anonymous` makes a user with
//! no email and the role `anonymous` and starts a session for it, so an app can keep a
//! guest's data under a user id from the first screen; `POST /users` with that user's
//! access token gives it an email and a password and the role `user`, keeping its id
//! and its sessions (the next refresh carries the new roles). Never converted, it is
//! deleted `cleanup.anonymous_retention_secs` after its last refresh.
//!
//! An anonymous user has no password: its stored hash is [`NO_PASSWORD`], which is no
//! PHC string, so no password ever matches it; it only lets the session statement's
//! check ("the user still has the hash the password was checked against") pass. It
//! cannot log in (no email to look it up by), change a password, change an email or
//! delete itself (each needs the password); it only refreshes, logs out and converts.
//!
//! The conversion revokes nothing: it only adds (an email, a role in place of
//! `anonymous`), and a token still saying `anonymous` grants less than the new roles.

use std::net::IpAddr;

use serde_json::json;

use super::access_token::Claims;
use super::device::DeviceToken;
use super::session::{AuthService, SessionStart, TokenGrant};
use crate::domain::{ANONYMOUS_ROLE, Email, Password};
use crate::error::ApiError;
use crate::store::{AuditKind, ClientInfo, User};

/// The stored "hash" of a user without a password.
pub const NO_PASSWORD: &str = "!no-password";

impl AuthService {
    /// `POST /users/anonymous`: a new anonymous user and a session for it (remembered:
    /// the session is the only way back to the user), throttled per IP like a
    /// registration.
    pub async fn create_anonymous(
        &self,
        ip: IpAddr,
        client: &ClientInfo,
    ) -> Result<TokenGrant, ApiError> {
        if !self.settings().registration.anonymous {
            return Err(ApiError::NotFound);
        }
        self.throttle
            .check_ip(ip)
            .map_err(|t| ApiError::RateLimited(t.retry_after_secs))?;
        let user = self.store.create_anonymous(NO_PASSWORD).await?;
        let device = DeviceToken::generate();
        let (created, refresh) = self
            .open_session(
                SessionStart {
                    user: user.id,
                    password_hash: NO_PASSWORD,
                    remember_me: true,
                    device: &device,
                    notice: None,
                    // No authentication method at all.
                    amr: &[],
                    roles: &user.roles,
                },
                client,
            )
            .await?
            .ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!("the new anonymous user went away"))
            })?;
        self.audit(
            AuditKind::AnonymousCreated,
            Some(user.id),
            Some(created.grant.session_id),
            client,
            json!({}),
        )
        .await;
        let mut grant = self.token_grant(&created.grant, refresh)?;
        grant.device_token = Some(device);
        Ok(grant)
    }

    /// `POST /users` with an anonymous user's access token: the user gets `email`,
    /// `password` and the role `user`, keeping its id. 409 `conflict` when the token's
    /// user is not anonymous (any more) or another account has the email.
    pub async fn convert_anonymous(
        &self,
        claims: &Claims,
        email: Email,
        password: Password,
        ip: IpAddr,
        client: &ClientInfo,
    ) -> Result<User, ApiError> {
        if !claims.roles.iter().any(|r| r == ANONYMOUS_ROLE) {
            return Err(ApiError::Conflict);
        }
        self.throttle
            .check_ip(ip)
            .map_err(|t| ApiError::RateLimited(t.retry_after_secs))?;
        let hash = self.hasher.hash(password).await?;
        let link = self.registration_link(&email);
        let user = self
            .store
            .convert_anonymous(
                claims.sub,
                &email,
                &hash,
                &["user".to_owned()],
                link.as_ref().map(|l| l.grant()),
            )
            .await?
            .ok_or(ApiError::Conflict)?;
        self.audit(
            AuditKind::AnonymousConverted,
            Some(user.id),
            Some(claims.sid),
            client,
            json!({"verification_sent": link.is_some()}),
        )
        .await;
        self.registration_link_sent(link.is_some(), user.id, client)
            .await;
        Ok(user)
    }

    /// Deletes anonymous users never converted and idle past
    /// `cleanup.anonymous_retention_secs`, as a deletion by the cleanup; how many.
    pub(super) async fn delete_idle_anonymous(&self, batch: i64) -> Result<u64, ApiError> {
        let retention = self.settings().cleanup.anonymous_retention_secs as i64;
        let mut deleted = 0;
        loop {
            let idle = self.store.idle_anonymous_users(retention, batch).await?;
            for &user in &idle {
                match self.delete_user(user, super::admin::By::Cleanup).await {
                    Ok(()) => deleted += 1,
                    // Another instance's cleanup got there first.
                    Err(ApiError::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
            if (idle.len() as i64) < batch {
                return Ok(deleted);
            }
            tokio::task::yield_now().await;
        }
    }
}
