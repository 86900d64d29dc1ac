//! Step-up authentication (RFC 9470): what a token must show beyond being valid.
//!
//! - Sensitive changes of one's own account (`PUT /me/password`, `DELETE /me/mfa/totp`)
//!   need an `auth_time` at most `mfa.recent_auth_secs` old; otherwise 401
//!   `insufficient_user_authentication` with `max_age` in `WWW-Authenticate`.
//! - Routes guarded by a role listed in `mfa.required_for_roles` need `otp` in the
//!   token's `amr`; otherwise the same error with `acr_values="mfa"`.
//! - `POST /me/reauthenticate` (the password, and a code when the user has a second
//!   factor) gives the session a new `auth_time` and `amr` and answers a fresh token
//!   response for it. The session's refresh tokens are replaced by a new chain, so a
//!   token from before is merely unknown afterwards (it cannot count as reuse: its owner
//!   just proved who they are, and a thief holding it is shut out).
//!
//! The checks read the access token alone, so they cost nothing per request; a token
//! issued before a reauthentication keeps its old `auth_time` and the client uses the
//! new one.

use std::net::IpAddr;

use serde_json::json;

use super::access_token::Claims;
use super::device::DeviceToken;
use super::mfa::{OTP_AMR, SecondFactor};
use super::refresh_token::RefreshToken;
use super::session::{AuthService, PASSWORD_AMR, TokenGrant};
use crate::error::{ApiError, StepUp};
use crate::store::{AuditKind, ClientInfo, Reauthentication};

impl AuthService {
    /// 401 `insufficient_user_authentication` (`max_age`) unless the token's
    /// authentication is at most `mfa.recent_auth_secs` old.
    pub fn require_recent_auth(&self, claims: &Claims) -> Result<(), ApiError> {
        let max_age = self.settings().mfa.recent_auth_secs;
        let age = chrono::Utc::now().timestamp() - claims.auth_time;
        if age <= max_age as i64 {
            Ok(())
        } else {
            Err(ApiError::InsufficientUserAuthentication(StepUp::MaxAge(
                max_age,
            )))
        }
    }

    /// For a route guarded by `role`: 403 `insufficient_scope` without the role; 401
    /// `insufficient_user_authentication` (`acr_values="mfa"`) when the role is in
    /// `mfa.required_for_roles` and the token's `amr` lacks `otp`.
    pub fn require_role(&self, claims: &Claims, role: &str) -> Result<(), ApiError> {
        if !claims.roles.iter().any(|r| r == role) {
            return Err(ApiError::InsufficientScope);
        }
        let needs_mfa = self
            .settings()
            .mfa
            .required_for_roles
            .iter()
            .any(|r| r == role);
        if needs_mfa && !claims.amr.iter().any(|m| m == OTP_AMR) {
            return Err(ApiError::InsufficientUserAuthentication(StepUp::Mfa));
        }
        Ok(())
    }

    /// `POST /me/reauthenticate`: the password (under the login's throttles) and, for a
    /// user with a second factor, a code or a recovery code; then the caller's session
    /// gets a new `auth_time` and `amr` and a new refresh token.
    #[tracing::instrument(skip_all, fields(user_id = %claims.sub))]
    pub async fn reauthenticate(
        &self,
        claims: &Claims,
        password: crate::domain::Password,
        factor: Option<SecondFactor>,
        device: Option<DeviceToken>,
        ip: IpAddr,
        client: &ClientInfo,
    ) -> Result<TokenGrant, ApiError> {
        self.check_own_password(
            claims,
            password,
            device,
            ip,
            client,
            AuditKind::StepUpFailed,
        )
        .await?;
        let has_totp = self
            .store
            .totp(claims.sub)
            .await?
            .is_some_and(|t| t.confirmed);
        let mut amr = vec![PASSWORD_AMR.to_owned()];
        match (has_totp, factor) {
            (true, Some(factor)) => {
                if !self
                    .check_second_factor(claims.sub, &factor, client)
                    .await?
                {
                    self.step_up_failed(claims, client).await;
                    return Err(ApiError::InvalidCredentials);
                }
                amr.push(OTP_AMR.to_owned());
            }
            (true, None) => {
                return Err(ApiError::InvalidRequest(
                    "this account has a second factor: give code (or recovery_code) too".into(),
                ));
            }
            (false, Some(_)) => {
                return Err(ApiError::InvalidRequest(
                    "this account has no second factor: give the password alone".into(),
                ));
            }
            (false, None) => {}
        }
        let (refresh, chain_hash) = RefreshToken::start_chain_hashed(claims.sid);
        let grant = self
            .store
            .reauthenticate_session(Reauthentication {
                session: claims.sid,
                user: claims.sub,
                amr: &amr,
                refresh_hash: &refresh.hash(),
                chain_hash: &chain_hash,
            })
            .await?
            // The session ended (or the user was disabled) meanwhile.
            .ok_or(ApiError::InvalidToken)?;
        self.audit(
            AuditKind::StepUpPassed,
            Some(claims.sub),
            Some(claims.sid),
            client,
            json!({"amr": amr}),
        )
        .await;
        self.token_grant(&grant, refresh)
    }

    async fn step_up_failed(&self, claims: &Claims, client: &ClientInfo) {
        self.audit(
            AuditKind::StepUpFailed,
            Some(claims.sub),
            Some(claims.sid),
            client,
            json!({}),
        )
        .await;
    }
}
