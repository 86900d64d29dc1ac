//! Second factor: TOTP (RFC 6238: HMAC-SHA-1, 6 digits, 30 s steps, what every
//! authenticator app reads) with ten single-use recovery codes.
//!
//! Enrollment (`POST /me/mfa/totp`) makes a 160-bit secret and answers it with its
//! `otpauth://` URI and a QR code (SVG); nothing is enforced until a code confirms it
//! (`POST /me/mfa/totp/confirm`), which also answers the recovery codes, shown once and
//! stored as SHA-256 (they are 80 random bits each). The secret is stored sealed
//! (AES-256-GCM under `keys.dir/mfa.secret`, the user id as associated data: see
//! [`crate::seal`]), so a database dump alone does not yield it.
//!
//! A code is accepted for the current step or one step either side; the step it
//! matched is recorded (`mfa_totp.last_step`) by a conditional update that only moves
//! forward, so a code is accepted once, and one of an earlier step than one already used
//! is refused too (a replay within the skew window).
//!
//! Login: a correct password for a user with a confirmed TOTP answers `mfa_required`
//! with an `mfa_token` (256 bits, stored as SHA-256, 5 minutes, 5 wrong codes) instead
//! of tokens; `POST /login/mfa` with a code or a recovery code starts the session then,
//! with `amr: ["pwd", "otp"]`. Codes are admitted like passwords (the same per-IP and
//! per-account throttles, the same failure budget).

use std::net::IpAddr;

use serde_json::json;
use totp_rs::{Algorithm, TOTP};

use super::access_token::Claims;
use super::device::DeviceToken;
use super::refresh_token::RefreshToken;
use super::session::{AuthService, PASSWORD_AMR, SessionStart, TokenGrant};
use crate::domain::{Password, UserId, sha256};
use crate::error::{ApiError, GrantFailure};
use crate::store::{AuditKind, ClientInfo, MfaChallenge, Outcome};

/// The `amr` value (RFC 8176) of a one-time code.
pub const OTP_AMR: &str = "otp";
const STEP_SECS: u64 = 30;
const DIGITS: usize = 6;
const RECOVERY_CODES: usize = 10;
/// How long an `mfa_token` lives, and how many wrong codes it takes.
pub const CHALLENGE_TTL_SECS: i64 = 300;
pub const CHALLENGE_MAX_FAILURES: i32 = 5;
/// Sealed into a challenge in place of a device token when the login showed none.
const NEW_DEVICE: &str = "new";

/// What enrollment answers.
pub struct Enrollment {
    pub secret: String,
    pub otpauth_uri: String,
    pub qr_svg: String,
}

/// A second factor as a client presents it.
pub enum SecondFactor {
    Code(String),
    RecoveryCode(String),
}

/// What a login comes to.
pub enum LoginOutcome {
    Tokens(TokenGrant),
    /// The password was right; a code is needed (`POST /login/mfa`).
    MfaRequired {
        mfa_token: String,
    },
}

fn recovery_hash(code: &str) -> Vec<u8> {
    // Codes are read case-insensitively and without their dashes.
    let canonical: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    sha256(canonical.as_bytes()).to_vec()
}

/// Ten codes of 80 random bits each, as `xxxx-xxxx-xxxx-xxxx` (base32, lower case).
fn new_recovery_codes() -> Vec<String> {
    (0..RECOVERY_CODES)
        .map(|_| {
            let bytes: [u8; 10] = rand_bytes();
            let text = base32_lower(&bytes);
            text.as_bytes()
                .chunks(4)
                .map(|c| std::str::from_utf8(c).expect("ascii"))
                .collect::<Vec<_>>()
                .join("-")
        })
        .collect()
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .expect("the OS random generator failed");
    out
}

fn base32_lower(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

impl AuthService {
    fn totp(&self, secret: Vec<u8>, account: &str) -> Result<TOTP, ApiError> {
        TOTP::new(
            Algorithm::SHA1,
            DIGITS,
            1,
            STEP_SECS,
            secret,
            Some(self.settings().mfa.issuer_name.clone()),
            account.to_owned(),
        )
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("TOTP parameters: {e}")))
    }

    /// The step a `code` matches for `secret` now (±1 step), compared in constant
    /// time; `None` if it matches none.
    fn matching_step(&self, totp: &TOTP, code: &str) -> Option<i64> {
        let code = code.trim();
        if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let step = (now / STEP_SECS) as i64;
        let mut found = None;
        for candidate in [step - 1, step, step + 1] {
            let expected = totp.generate(candidate as u64 * STEP_SECS);
            let same = expected.len() == code.len()
                && expected
                    .bytes()
                    .zip(code.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0;
            if same && found.is_none() {
                found = Some(candidate);
            }
        }
        found
    }

    fn open_secret(&self, user: UserId, sealed: &[u8]) -> Result<Vec<u8>, ApiError> {
        self.mfa_sealer
            .open(sealed, user.0.as_bytes())
            .ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!(
                    "a TOTP secret does not open: was keys.dir/mfa.secret replaced?"
                ))
            })
    }

    /// `POST /me/mfa/totp`: a new secret for the caller, not enforced until confirmed.
    /// 409 when TOTP is already on (remove it first).
    pub async fn start_totp(
        &self,
        claims: &Claims,
        client: &ClientInfo,
    ) -> Result<Enrollment, ApiError> {
        let user = self.current_user(claims.sub).await?;
        let account = user.email.clone().ok_or(ApiError::Conflict)?;
        let secret: [u8; 20] = rand_bytes();
        let totp = self.totp(secret.to_vec(), &account)?;
        let sealed = self.mfa_sealer.seal(&secret, user.id.0.as_bytes());
        if !self.store.start_totp(user.id, &sealed).await? {
            return Err(ApiError::Conflict);
        }
        let otpauth_uri = totp.get_url();
        let qr_svg = qrcode::QrCode::new(otpauth_uri.as_bytes())
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("QR code: {e}")))?
            .render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(200, 200)
            .build();
        self.audit(
            AuditKind::MfaEnrollmentStarted,
            Some(user.id),
            Some(claims.sid),
            client,
            json!({}),
        )
        .await;
        Ok(Enrollment {
            secret: totp.get_secret_base32(),
            otpauth_uri,
            qr_svg,
        })
    }

    /// `POST /me/mfa/totp/confirm`: a code of the enrolling secret turns TOTP on; the
    /// recovery codes, shown once.
    pub async fn confirm_totp(
        &self,
        claims: &Claims,
        code: &str,
        client: &ClientInfo,
    ) -> Result<Vec<String>, ApiError> {
        let row = self
            .store
            .totp(claims.sub)
            .await?
            .filter(|r| !r.confirmed)
            .ok_or_else(|| {
                ApiError::InvalidRequest("no enrollment to confirm: POST /me/mfa/totp first".into())
            })?;
        let secret = self.open_secret(claims.sub, &row.secret_sealed)?;
        let totp = self.totp(secret, "")?;
        let Some(step) = self.matching_step(&totp, code) else {
            self.audit(
                AuditKind::MfaCodeFailed,
                Some(claims.sub),
                Some(claims.sid),
                client,
                json!({"during": "confirmation"}),
            )
            .await;
            return Err(ApiError::InvalidCredentials);
        };
        let codes = new_recovery_codes();
        let hashes: Vec<Vec<u8>> = codes.iter().map(|c| recovery_hash(c)).collect();
        if !self.store.confirm_totp(claims.sub, step, &hashes).await? {
            return Err(ApiError::Conflict);
        }
        self.second_factor_changed(claims.sub).await?;
        self.audit(
            AuditKind::MfaEnabled,
            Some(claims.sub),
            Some(claims.sid),
            client,
            json!({"recovery_codes": codes.len()}),
        )
        .await;
        Ok(codes)
    }

    /// Whether `factor` passes for `user` now (a code of a step not used before, or an
    /// unused recovery code), with its audit row when it does not, or when a recovery
    /// code is used.
    pub(super) async fn check_second_factor(
        &self,
        user: UserId,
        factor: &SecondFactor,
        client: &ClientInfo,
    ) -> Result<bool, ApiError> {
        let passed = match factor {
            SecondFactor::Code(code) => match self.store.totp(user).await? {
                Some(row) if row.confirmed => {
                    let secret = self.open_secret(user, &row.secret_sealed)?;
                    let totp = self.totp(secret, "")?;
                    match self.matching_step(&totp, code) {
                        Some(step) => self.store.use_totp_step(user, step).await?,
                        None => false,
                    }
                }
                _ => false,
            },
            SecondFactor::RecoveryCode(code) => {
                match self
                    .store
                    .use_recovery_code(user, &recovery_hash(code))
                    .await?
                {
                    Some(left) => {
                        self.audit(
                            AuditKind::MfaRecoveryCodeUsed,
                            Some(user),
                            None,
                            client,
                            json!({"remaining": left}),
                        )
                        .await;
                        true
                    }
                    None => false,
                }
            }
        };
        if !passed {
            self.audit(
                AuditKind::MfaCodeFailed,
                Some(user),
                None,
                client,
                json!({}),
            )
            .await;
        }
        Ok(passed)
    }

    /// `DELETE /me/mfa/totp`: after the password and a code (or a recovery code), TOTP
    /// and the recovery codes go and every other session ends.
    pub async fn remove_totp(
        &self,
        claims: &Claims,
        password: Password,
        factor: SecondFactor,
        device: Option<DeviceToken>,
        ip: IpAddr,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        self.require_recent_auth(claims)?;
        self.check_own_password(
            claims,
            password,
            device,
            ip,
            client,
            AuditKind::MfaCodeFailed,
        )
        .await?;
        if !self
            .check_second_factor(claims.sub, &factor, client)
            .await?
        {
            return Err(ApiError::InvalidCredentials);
        }
        let ended = self
            .store
            .remove_totp(claims.sub, Some(claims.sid))
            .await?
            .ok_or(ApiError::NotFound)?;
        self.deny_sessions(&ended).await?;
        self.second_factor_changed(claims.sub).await?;
        self.audit(
            AuditKind::MfaDisabled,
            Some(claims.sub),
            Some(claims.sid),
            client,
            json!({"sessions_ended": ended.len()}),
        )
        .await;
        Ok(())
    }

    /// `DELETE /admin/users/{id}/mfa`: an admin removes a user's second factor (every
    /// session of the user ends). A user without one has nothing to remove: 204 all the
    /// same (a repeated DELETE is not an error), with no audit row; 404 is for no user.
    pub async fn admin_remove_totp(
        &self,
        admin: &Claims,
        user: UserId,
        client: &ClientInfo,
    ) -> Result<(), ApiError> {
        let Some(ended) = self.store.remove_totp(user, None).await? else {
            return match self.store.find_user(user).await? {
                Some(_) => Ok(()),
                None => Err(ApiError::NotFound),
            };
        };
        self.deny_sessions(&ended).await?;
        self.second_factor_changed(user).await?;
        self.audit_by(
            super::admin::By::Admin(admin, client),
            AuditKind::MfaResetByAdmin,
            user,
            json!({"sessions_ended": ended.len()}),
        )
        .await;
        Ok(())
    }

    /// A second factor turned on or off: access tokens issued before stop working (the
    /// session goes on: its next refresh gets a new one), so that `GET /me`'s memory
    /// never shows the old state (see [`AuthService::profile_of`]).
    async fn second_factor_changed(&self, user: UserId) -> Result<(), ApiError> {
        self.forget_email(user);
        self.revoke_user_tokens(user).await
    }

    /// After a correct password: if the user has TOTP, the challenge to answer instead of
    /// tokens (`None`: no second factor).
    pub(super) async fn mfa_challenge(
        &self,
        user: UserId,
        password_hash: &str,
        remember_me: bool,
        cookie: bool,
        known_device: Option<&DeviceToken>,
    ) -> Result<Option<String>, ApiError> {
        match self.store.totp(user).await? {
            Some(row) if row.confirmed => {}
            _ => return Ok(None),
        }
        let token = RefreshToken::generate();
        let hash = token.hash();
        let challenge = MfaChallenge {
            user_id: user,
            password_hash: password_hash.to_owned(),
            remember_me,
            cookie,
            // No known device: a marker that is no device token, so the second step
            // makes one and knows the device is new.
            device_sealed: self.mfa_sealer.seal(
                known_device.map_or(NEW_DEVICE.as_bytes(), |d| d.expose().as_bytes()),
                &hash,
            ),
            failures: 0,
        };
        self.store
            .create_mfa_challenge(&hash, &challenge, CHALLENGE_TTL_SECS)
            .await?;
        Ok(Some(token.expose().to_owned()))
    }

    /// `POST /login/mfa`: the second step of a login. A wrong code counts against the
    /// account's failure budget and the `mfa_token` (5 end it); a right one starts the
    /// session. The grant, and whether the login asked for cookie delivery.
    pub async fn login_mfa(
        &self,
        mfa_token: &str,
        factor: SecondFactor,
        ip: IpAddr,
        client: &ClientInfo,
    ) -> Result<(TokenGrant, bool), ApiError> {
        let dead = || ApiError::InvalidGrant(GrantFailure::Unknown);
        let token = RefreshToken::parse(mfa_token).ok_or_else(dead)?;
        let hash = token.hash();
        let challenge = self.store.mfa_challenge(&hash).await?.ok_or_else(dead)?;
        if challenge.failures >= CHALLENGE_MAX_FAILURES {
            return Err(dead());
        }
        let user = self
            .current_user(challenge.user_id)
            .await
            .map_err(|_| dead())?;
        let email = user.address().ok_or_else(dead)?;
        // Admitted like a password: throttles and the account's failure budget.
        let attempt = self
            .admit_password_attempt(&email, None, ip, client)
            .await?;
        if !self.check_second_factor(user.id, &factor, client).await? {
            attempt.finish(Outcome::Failed).await;
            if self.store.fail_mfa_challenge(&hash).await? >= CHALLENGE_MAX_FAILURES {
                self.store.take_mfa_challenge(&hash).await?;
            }
            return Err(ApiError::InvalidCredentials);
        }
        attempt.finish(Outcome::Succeeded).await;
        if !self.store.take_mfa_challenge(&hash).await? {
            return Err(dead()); // used by a concurrent request
        }
        let known_device = self
            .mfa_sealer
            .open(&challenge.device_sealed, &hash)
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|d| DeviceToken::parse(&d));
        let new_device = known_device.is_none();
        let device = known_device.unwrap_or_else(DeviceToken::generate);
        let (created, refresh) = self
            .open_session(
                SessionStart {
                    user: user.id,
                    password_hash: &challenge.password_hash,
                    remember_me: challenge.remember_me,
                    device: &device,
                    notice: None,
                    amr: &[PASSWORD_AMR.to_owned(), OTP_AMR.to_owned()],
                    roles: &user.roles,
                },
                client,
            )
            .await?
            // The password changed or the user was disabled meanwhile.
            .ok_or(ApiError::InvalidCredentials)?;
        self.deny_sessions(&created.evicted).await?;
        self.audit(
            AuditKind::LoginSucceeded,
            Some(user.id),
            Some(created.grant.session_id),
            client,
            json!({"remember_me": challenge.remember_me, "mfa": true, "new_device": new_device}),
        )
        .await;
        let mut grant = self.token_grant(&created.grant, refresh)?;
        grant.device_token = Some(device);
        Ok((grant, challenge.cookie))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_codes_are_80_bits_in_groups_and_read_loosely() {
        let codes = new_recovery_codes();
        assert_eq!(codes.len(), 10);
        assert!(
            codes
                .iter()
                .all(|c| c.len() == 19 && c.matches('-').count() == 3)
        );
        assert_ne!(codes[0], codes[1]);
        assert_eq!(
            recovery_hash(&codes[0]),
            recovery_hash(&codes[0].to_uppercase().replace('-', " "))
        );
        assert_eq!(base32_lower(b"foobar"), "mzxw6ytboi");
    }
}
