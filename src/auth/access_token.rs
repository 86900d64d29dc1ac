//! Access tokens: JWTs per RFC 9068, signed with the keyring's active key.
//!
//! Verification follows RFC 8725: the key is chosen by `kid` and the algorithm comes
//! from that key, never from the token (so `alg: none` and HS256-with-the-public-key
//! forgeries fail); `typ` must be `at+jwt`; `iss`, `aud`, `exp`, `nbf` are checked
//! with the configured leeway and every contract claim must be present.
//!
//! Checking an ES256 signature costs tens of microseconds, the largest single cost of
//! a `GET /me`, and an SPA presents the same access token many times during its life.
//! So a token that passed is remembered (by the SHA-256 of the whole token, with its
//! claims and the kid and fingerprint of the key that verified it), and the same token
//! presented again skips the signature and claim checks only: `exp` is checked on every
//! use, and the entry counts only while the keyring still holds that very key (a key
//! file removed from the directory, or replaced, takes its tokens with it at the next
//! reload). Tokens that fail are not remembered, so forgeries always pay the full check
//! and cannot push out good entries. Revocation is not affected: the denylist is asked
//! on every request after this check.

use std::collections::HashSet;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use jsonwebtoken::Validation;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::keys::{KeyMaterial, SharedKeyring, jwt_algorithm};
use super::recent::Recent;
use crate::config::TokenSettings;
use crate::domain::{ANONYMOUS_ROLE, SessionId, UserId};
use crate::store::Grant;

pub const TOKEN_TYPE: &str = "at+jwt";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: UserId,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    pub sid: SessionId,
    pub roles: Vec<String>,
    /// Whether the user's email address was verified when the token was issued (a
    /// verification shows in the next refresh's token).
    #[serde(default)]
    pub email_verified: bool,
    /// A user created by `POST /users/anonymous` and not converted yet (role
    /// `anonymous`).
    #[serde(default)]
    pub is_anonymous: bool,
    /// How the user authenticated (RFC 8176): `["pwd"]`, `["pwd", "otp"]`.
    #[serde(default)]
    pub amr: Vec<String>,
    /// When the user last authenticated (the login, or a reauthentication), Unix
    /// seconds; kept across refreshes.
    #[serde(default)]
    pub auth_time: i64,
}

impl Claims {
    /// When the token was issued, in Unix milliseconds: the timestamp of its `jti`, a
    /// UUIDv7, so that a per-user "revoked up to T" mark can tell a token issued just
    /// before a role change from one issued just after it within the same second.
    /// A `jti` that is not a UUIDv7 counts as issued at the start of its `iat` second.
    /// `tessera_verify::Claims::issued_at_ms` must read it the same way (the downstream
    /// tests revoke by a role change and check that the verifier agrees).
    pub fn issued_at_ms(&self) -> i64 {
        Uuid::parse_str(&self.jti)
            .ok()
            .filter(|id| id.get_version_num() == 7)
            .and_then(|id| id.get_timestamp())
            .map(|ts| {
                let (secs, nanos) = ts.to_unix();
                secs as i64 * 1000 + i64::from(nanos / 1_000_000)
            })
            .unwrap_or(self.iat * 1000)
    }
}

pub struct AccessTokens {
    keys: Arc<SharedKeyring>,
    issuer: String,
    audience: String,
    /// The lifetimes, per role too.
    lifetimes: TokenSettings,
    leeway_secs: u64,
    verified: Recent<[u8; 32], Verified>,
}

/// A token that passed every check: its claims and which key's signature it bears.
#[derive(Clone)]
struct Verified {
    claims: Claims,
    kid: String,
    fingerprint: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("unknown key id")]
    UnknownKey,
    #[error("wrong token type")]
    WrongType,
    #[error("invalid token: {0}")]
    Invalid(jsonwebtoken::errors::Error),
}

impl AccessTokens {
    pub fn new(keys: Arc<SharedKeyring>, settings: &TokenSettings) -> Self {
        AccessTokens {
            keys,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            lifetimes: settings.clone(),
            leeway_secs: settings.leeway_secs,
            verified: Recent::new(0),
        }
    }

    /// Remembers up to `capacity` tokens that passed (see the module doc); 0 (the
    /// default of [`AccessTokens::new`]) checks every token in full every time.
    pub fn remembering(mut self, capacity: usize) -> Self {
        self.verified = Recent::new(capacity);
        self
    }

    /// The lifetime of an access token for a user holding `roles` (`[tokens.roles]`).
    pub fn ttl_secs(&self, roles: &[String]) -> i64 {
        self.lifetimes.lifetimes_for(roles, true).access_ttl_secs as i64
    }

    pub fn keyring(&self) -> &SharedKeyring {
        &self.keys
    }

    /// Signs a token issued at `issued_at`: the database's clock when the statement that
    /// granted it ran (see [`crate::store::Grant::issued_at`]), which is also its `jti`'s
    /// UUIDv7 timestamp, so per-user marks compare times from one clock.
    pub fn issue(&self, grant: &Grant) -> anyhow::Result<String> {
        let issued_at = grant.issued_at;
        let now = issued_at.timestamp();
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            now.max(0) as u64,
            issued_at.timestamp_subsec_nanos(),
        );
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: grant.user_id,
            aud: self.audience.clone(),
            exp: now + self.ttl_secs(&grant.roles),
            iat: now,
            nbf: now,
            jti: Uuid::new_v7(ts).to_string(),
            sid: grant.session_id,
            roles: grant.roles.clone(),
            email_verified: grant.email_verified,
            is_anonymous: grant.roles.iter().any(|r| r == ANONYMOUS_ROLE),
            amr: grant.amr.clone(),
            auth_time: grant.auth_time.timestamp(),
        };
        let ring = self.keys.current();
        let key = &ring.signing;
        // JWS compact serialization (RFC 7515 §7.1): the key's header (encoded once when
        // the key was loaded), the claims, and the signature by the key parsed once.
        let mut token = String::with_capacity(512);
        token.push_str(&key.jws_header);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(serde_json::to_vec(&claims)?, &mut token);
        key.signer.sign_appending(&mut token)?;
        Ok(token)
    }

    /// Checks signature and claims; says nothing about revocation (see the denylist).
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > 8192 {
            return Err(TokenError::Malformed);
        }
        let id = super::sha256(token.as_bytes());
        if let Some(seen) = self.verified.get(&id) {
            let key_kept = self
                .keys
                .current()
                .verifying
                .get(&seen.kid)
                .is_some_and(|key| key.fingerprint == seen.fingerprint);
            if !key_kept {
                self.verified.remove(&id);
            } else if seen.claims.exp < Utc::now().timestamp() - self.leeway_secs as i64 {
                // The same test jsonwebtoken makes; the entry is dropped with the next
                // generation (an expired token may well come back a few times).
                return Err(TokenError::Invalid(
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature.into(),
                ));
            } else {
                return Ok(seen.claims);
            }
        }
        let (claims, key) = self.check(token)?;
        self.verified.insert(
            id,
            Verified {
                claims: claims.clone(),
                kid: key.kid.clone(),
                fingerprint: key.fingerprint,
            },
        );
        Ok(claims)
    }

    /// The full check: header, key, signature, claims.
    fn check(&self, token: &str) -> Result<(Claims, Arc<KeyMaterial>), TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let typ_ok = header.typ.as_deref().is_some_and(|t| {
            t.eq_ignore_ascii_case(TOKEN_TYPE) || t.eq_ignore_ascii_case("application/at+jwt")
        });
        if !typ_ok {
            return Err(TokenError::WrongType);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let key = self
            .keys
            .verifying_key(&kid)
            .ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(jwt_algorithm(key.alg));
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.required_spec_claims = ["exp", "iat", "nbf", "iss", "aud", "sub"]
            .into_iter()
            .map(String::from)
            .collect::<HashSet<_>>();
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
            .map_err(TokenError::Invalid)?
            .claims;
        Ok((claims, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(jti: String, iat: i64) -> Claims {
        Claims {
            iss: "i".into(),
            sub: UserId(Uuid::nil()),
            aud: "a".into(),
            exp: iat + 60,
            iat,
            nbf: iat,
            jti,
            sid: SessionId(Uuid::nil()),
            roles: vec![],
            email_verified: false,
            is_anonymous: false,
            amr: vec![],
            auth_time: 0,
        }
    }

    #[test]
    fn issue_time_comes_from_a_v7_jti_in_milliseconds() {
        let before = Utc::now().timestamp_millis();
        let c = claims(Uuid::now_v7().to_string(), 5);
        let after = Utc::now().timestamp_millis();
        assert!((before..=after).contains(&c.issued_at_ms()));
        // Without a v7 jti: the start of the iat second.
        assert_eq!(claims(Uuid::new_v4().to_string(), 7).issued_at_ms(), 7000);
        assert_eq!(claims("not a uuid".into(), 9).issued_at_ms(), 9000);
    }

    #[test]
    fn a_remembered_token_counts_only_while_the_keyring_holds_that_very_key() {
        use super::super::keys::{KeyAlgorithm, KeyStore};
        use std::time::Duration;

        let temp =
            |name: &str| std::env::temp_dir().join(format!("tessera-{name}-{}", Uuid::new_v4()));
        let (dir, other) = (temp("keys"), temp("other-keys"));
        let store = KeyStore::new(&dir, KeyAlgorithm::Es256, Duration::from_secs(60));
        let kid = store.ensure_active().unwrap().unwrap();
        let ring = Arc::new(SharedKeyring::open(store).unwrap());
        let settings = crate::config::Settings::load_from(None, Vec::new()).unwrap();
        let tokens = AccessTokens::new(ring.clone(), &settings.tokens).remembering(10);
        let token = tokens
            .issue(&Grant {
                session_id: SessionId(Uuid::new_v4()),
                user_id: UserId(Uuid::new_v4()),
                roles: vec![],
                email_verified: false,
                amr: vec!["pwd".into()],
                auth_time: Utc::now(),
                expires_at: Utc::now(),
                remember_me: false,
                issued_at: Utc::now(),
            })
            .unwrap();
        tokens.verify(&token).unwrap();
        tokens.verify(&token).unwrap();

        // Different key material under the same kid (a key file replaced by hand).
        let other_kid = KeyStore::new(&other, KeyAlgorithm::Es256, Duration::from_secs(60))
            .ensure_active()
            .unwrap()
            .unwrap();
        let read = |path: std::path::PathBuf| {
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(path).unwrap()).unwrap()
        };
        let path = dir.join(format!("{kid}.json"));
        let mut file = read(path.clone());
        file["private_key"] = read(other.join(format!("{other_kid}.json")))["private_key"].clone();
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        ring.reload();
        assert!(
            tokens.verify(&token).is_err(),
            "the old key's token must fail"
        );
        for d in [dir, other] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
