//! Emailed links: the single-use tokens they carry and what using one does. A link is
//! `{email.link_base}?action=<action>&token=<token>`; opening it changes nothing on
//! Tessera (a mail scanner may follow it): the app's page POSTs the token.
//!
//! A token is 256 bits from the CSPRNG, base64url; only its SHA-256 is stored, with its
//! kind, user and expiry. A newer token of the same kind for the same user deletes the
//! older ones (they then read as `unknown`). Its message is an outbox row written in the
//! same transaction (see [`crate::outbox`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use chrono::{Duration, Utc};
use serde_json::json;

use super::access_token::Claims;
use super::device::DeviceToken;
use super::refresh_token::RefreshToken;
use super::session::AuthService;
use crate::config::{EmailVerification, NoticeKind};
use crate::domain::{Email, Password, UserId};
use crate::email::templates::Template;
use crate::error::ApiError;
use crate::outbox::Item;
use crate::store::{
    AuditKind, Budget, ClientInfo, EmailTokenGrant, EmailTokenKind, TokenRefusal, User,
};

/// An emailed token in plain text; `Debug` never shows it. Same format as a refresh
/// token, looked up only among email tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct EmailToken(RefreshToken);

impl fmt::Debug for EmailToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EmailToken([redacted])")
    }
}

impl EmailToken {
    pub fn generate() -> Self {
        EmailToken(RefreshToken::generate())
    }

    /// `None` for anything that cannot have been issued.
    pub fn parse(s: &str) -> Option<Self> {
        RefreshToken::parse(s).map(EmailToken)
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    pub fn hash(&self) -> Vec<u8> {
        self.0.hash()
    }
}

/// A token, its message sealed for the outbox, and when it expires: what the store
/// writes in one transaction.
pub struct IssuedLink {
    pub token: EmailToken,
    pub hash: Vec<u8>,
    pub message: Vec<u8>,
    pub expires_at: chrono::DateTime<Utc>,
    pub kind: EmailTokenKind,
    /// For an email change: the new address, and the notice to the old one.
    pub new_email: Option<Email>,
    pub notice: Option<Vec<u8>>,
}

impl IssuedLink {
    pub fn grant(&self) -> EmailTokenGrant<'_> {
        EmailTokenGrant {
            kind: self.kind,
            token_hash: &self.hash,
            expires_at: self.expires_at,
            new_email: self.new_email.as_ref(),
            message: &self.message,
            notice: self.notice.as_deref(),
        }
    }
}

/// "24 hours", "30 minutes", "7 days": a lifetime as a message says it.
fn lifetime(secs: u64) -> String {
    let (n, unit) = match secs {
        s if s >= 86_400 && s.is_multiple_of(86_400) => (s / 86_400, "day"),
        s if s >= 3_600 && s.is_multiple_of(3_600) => (s / 3_600, "hour"),
        s if s >= 60 => (s.div_ceil(60), "minute"),
        s => (s, "second"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

impl AuthService {
    /// A new link of `kind` for the holder of `to`, with its sealed message.
    pub(crate) fn issue_link(
        &self,
        kind: EmailTokenKind,
        template: Template,
        user: Option<UserId>,
        to: &Email,
        ttl_secs: u64,
    ) -> IssuedLink {
        let token = EmailToken::generate();
        let link = format!(
            "{}?action={}&token={}",
            self.settings().email.link_base,
            kind.as_str(),
            token.expose()
        );
        let values: BTreeMap<String, String> = [
            ("email", to.as_str().to_owned()),
            ("link", link),
            ("expires_in", lifetime(ttl_secs)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let message = self.outbox.seal(&Item::Email {
            user,
            template: template.name().to_owned(),
            to: to.as_str().to_owned(),
            values,
        });
        IssuedLink {
            hash: token.hash(),
            token,
            message,
            expires_at: Utc::now() + Duration::seconds(ttl_secs as i64),
            kind,
            new_email: None,
            notice: None,
        }
    }

    /// After a registration's transaction: wakes the sender and audits the link if one
    /// was written with the user.
    pub(super) async fn registration_link_sent(
        &self,
        sent: bool,
        user: UserId,
        client: &ClientInfo,
    ) {
        if sent {
            self.outbox.wake();
            self.audit(
                AuditKind::VerificationSent,
                Some(user),
                None,
                client,
                json!({}),
            )
            .await;
        }
    }

    /// The verification link a registration sends, if `email.verification` asks for one.
    pub(super) fn registration_link(&self, email: &Email) -> Option<IssuedLink> {
        (self.settings().email.verification != EmailVerification::Off).then(|| {
            self.issue_link(
                EmailTokenKind::VerifyEmail,
                Template::VerifyEmail,
                None,
                email,
                self.settings().email.verify_ttl_secs,
            )
        })
    }

    /// Counts a request that emails `email` from `ip` (429 past the limits), the same
    /// whether or not an account has that address.
    pub fn check_mail_throttle(&self, ip: IpAddr, email: &Email) -> Result<(), ApiError> {
        self.mail_throttle
            .check(ip, &email.normalized())
            .map_err(ApiError::RateLimited)
    }

    /// Sends a verification link to `email` if an account with an unverified address
    /// has it; does nothing otherwise. The caller answers before this runs (see
    /// `http::email`), so its answer and timing say nothing about the account.
    pub async fn send_verification(
        &self,
        email: &Email,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        self.send_link(
            email,
            |user| !user.email_verified,
            (EmailTokenKind::VerifyEmail, Template::VerifyEmail),
            self.settings().email.verify_ttl_secs,
            AuditKind::VerificationSent,
            client,
        )
        .await
    }

    /// Sends a link of `kind` to the account that has `email`, if there is one and
    /// `wanted` says it should get one, with its audit row; nothing otherwise.
    async fn send_link(
        &self,
        email: &Email,
        wanted: impl Fn(&User) -> bool,
        (kind, template): (EmailTokenKind, Template),
        ttl_secs: u64,
        audited: AuditKind,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        let Some(found) = self.store.find_credentials(email, None).await? else {
            return Ok(());
        };
        let user = found.user;
        if !wanted(&user) {
            return Ok(());
        }
        let email = user.address().unwrap_or_else(|| email.clone());
        let link = self.issue_link(kind, template, Some(user.id), &email, ttl_secs);
        if self.store.issue_email_token(user.id, link.grant()).await? {
            self.outbox.wake();
            self.audit(audited, Some(user.id), None, client, json!({}))
                .await;
        }
        Ok(())
    }

    /// Uses a verification token: the user's address counts as verified from now on.
    pub async fn verify_email(&self, token: &str, client: &ClientInfo) -> Result<(), ApiError> {
        let token =
            EmailToken::parse(token).ok_or(ApiError::InvalidEmailToken(TokenRefusal::Unknown))?;
        let user = self
            .store
            .verify_email(&token.hash())
            .await?
            .map_err(ApiError::InvalidEmailToken)?;
        // What this instance remembers of the user said "not verified".
        self.forget_email(user);
        self.audit(
            AuditKind::EmailVerified,
            Some(user),
            None,
            client,
            json!({}),
        )
        .await;
        Ok(())
    }
}

impl AuthService {
    /// Sends a password reset link to `email` if an enabled account has it; does nothing
    /// otherwise. Like [`AuthService::send_verification`], after the answer.
    pub async fn send_password_reset(
        &self,
        email: &Email,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        self.send_link(
            email,
            |user| !user.disabled,
            (EmailTokenKind::ResetPassword, Template::ResetPassword),
            self.settings().email.reset_ttl_secs,
            AuditKind::PasswordResetRequested,
            client,
        )
        .await
    }

    /// Uses a reset token: the new password is in force, the address counts as
    /// verified, every session of the user ends (refresh tokens at once, access tokens
    /// on every instance) and the account's failed-login count is forgotten.
    pub async fn reset_password(
        &self,
        token: &str,
        new_password: Password,
        ip: IpAddr,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        let token =
            EmailToken::parse(token).ok_or(ApiError::InvalidEmailToken(TokenRefusal::Unknown))?;
        // Hashing costs what a login does: the same per-IP budget.
        self.throttle
            .check_ip(ip)
            .map_err(|t| ApiError::RateLimited(t.retry_after_secs))?;
        let hash = self.hasher.hash(new_password).await?;
        let notice = self.notice_for(NoticeKind::PasswordChanged);
        let noticed = notice.is_some();
        let reset = self
            .store
            .reset_password(&token.hash(), &hash, notice)
            .await?
            .map_err(ApiError::InvalidEmailToken)?;
        if noticed {
            self.outbox.wake();
        }
        self.deny_sessions(&reset.ended).await?;
        if let Err(e) = self
            .failures
            .reset(Budget::Account, &reset.email_normalized)
            .await
        {
            tracing::warn!(error = %e, "could not forget the account's failed logins");
        }
        self.audit(
            AuditKind::PasswordReset,
            Some(reset.user),
            None,
            client,
            json!({"sessions_ended": reset.ended.len()}),
        )
        .await;
        Ok(())
    }
}

impl AuthService {
    /// Asks to change the caller's email to `new_email`, after checking their password
    /// (like `PUT /me/password`): a confirmation link goes to the new address and a
    /// notice to the old one; nothing changes before the link is used. An address
    /// another account has gets no link (the answer is the same, so it reveals nothing).
    pub async fn request_email_change(
        &self,
        claims: &Claims,
        new_email: Email,
        password: Password,
        device: Option<DeviceToken>,
        ip: IpAddr,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        let credentials = self
            .check_own_password(
                claims,
                password,
                device,
                ip,
                client,
                AuditKind::EmailChangeRequested,
            )
            .await?;
        let user = credentials.user;
        let old = user.address().ok_or(ApiError::InvalidCredentials)?;
        if old.normalized() == new_email.normalized() {
            return Err(ApiError::InvalidRequest(
                "new_email is already this account's address".into(),
            ));
        }
        self.check_mail_throttle(ip, &new_email)?;
        if self.store.email_taken(&new_email, user.id).await? {
            self.audit(
                AuditKind::EmailChangeRequested,
                Some(user.id),
                Some(claims.sid),
                client,
                json!({"sent": false, "reason": "taken"}),
            )
            .await;
            return Ok(());
        }
        let mut link = self.issue_link(
            EmailTokenKind::ConfirmEmailChange,
            Template::ConfirmEmailChange,
            Some(user.id),
            &new_email,
            self.settings().email.verify_ttl_secs,
        );
        link.notice = self.notice(
            NoticeKind::EmailChanged,
            user.id,
            old.as_str(),
            &[("new_email", new_email.as_str().to_owned())],
        );
        link.new_email = Some(new_email);
        if self.store.issue_email_token(user.id, link.grant()).await? {
            self.outbox.wake();
            self.audit(
                AuditKind::EmailChangeRequested,
                Some(user.id),
                Some(claims.sid),
                client,
                json!({"sent": true}),
            )
            .await;
        }
        Ok(())
    }

    /// Uses an email change's confirmation token: the account's address becomes the
    /// new one (verified: the link reached it). Every access token of the user issued
    /// before stops working, so none goes on vouching for the old address (and `GET /me`
    /// reads the new one: see [`AuthService::profile_of`]); sessions go on.
    pub async fn confirm_email_change(
        &self,
        token: &str,
        client: &ClientInfo,
    ) -> Result<User, ApiError> {
        let token =
            EmailToken::parse(token).ok_or(ApiError::InvalidEmailToken(TokenRefusal::Unknown))?;
        let user = self
            .store
            .confirm_email_change(&token.hash())
            .await?
            .map_err(ApiError::InvalidEmailToken)?;
        self.forget_email(user.id);
        self.revoke_user_tokens(user.id).await?;
        self.audit(
            AuditKind::EmailChanged,
            Some(user.id),
            None,
            client,
            json!({}),
        )
        .await;
        Ok(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_read_as_a_person_would_say_them() {
        assert_eq!(lifetime(86_400), "1 day");
        assert_eq!(lifetime(7 * 86_400), "7 days");
        assert_eq!(lifetime(3_600), "1 hour");
        assert_eq!(lifetime(1_800), "30 minutes");
        assert_eq!(lifetime(90), "2 minutes");
        assert_eq!(lifetime(5), "5 seconds");
        assert_eq!(
            format!("{:?}", EmailToken::generate()),
            "EmailToken([redacted])"
        );
    }
}
