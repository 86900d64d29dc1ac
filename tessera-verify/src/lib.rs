//! Verify Tessera access tokens in a downstream API, locally, with revocation that
//! reaches it.
//!
//! ```no_run
//! # async fn run() -> Result<(), tessera_verify::VerifyError> {
//! use tessera_verify::{Config, Verifier};
//! let verifier = Verifier::new(Config::new("https://auth.example.com", "my-api"))?;
//! let claims = verifier.verify("eyJ...").await?;
//! println!("user {} in session {}", claims.sub, claims.sid);
//! # Ok(()) }
//! ```
//!
//! - **Keys** come from the issuer's JWKS (found through its RFC 8414 metadata, or a
//!   configured URL), cached as long as its `Cache-Control: max-age` says. A token with
//!   an unknown `kid` triggers a refetch, at most once per `refetch_interval`, so a
//!   flood of garbage tokens cannot cause a fetch storm; while the issuer is
//!   unreachable the cached keys keep working. A key rotation needs no restart.
//! - **Validation** follows RFC 8725 and RFC 9068: the algorithm comes from the key,
//!   never from the token (`alg: none` and HS256-signed-with-the-public-key fail);
//!   `typ` must be `at+jwt`; `iss`, `aud`, `exp`, `nbf` (with `leeway`) and every claim
//!   are checked. Each failure has its own [`VerifyError`] kind.
//! - **Revocation** (optional, [`RevocationConfig`]): a local set of revoked sessions,
//!   tokens and users, kept current by Redis pub/sub from the server and resynced in
//!   full on every (re)connect, so a check costs no network round trip. It needs the
//!   server to run with Redis: a Tessera without one (`redis.url` empty, the embedded
//!   single-instance mode) keeps its marks in its own process, and downstream APIs then
//!   have only the access tokens' short lifetime (or `/introspect`) to rely on.

#[cfg(feature = "actix")]
pub mod actix;
mod jwks;
mod revocation;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Validation;
use jsonwebtoken::errors::ErrorKind;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use jsonwebtoken::jwk::JwkSet;
pub use revocation::RevocationConfig;

use jwks::KeySource;
use revocation::Revocations;

/// The claims of a verified Tessera access token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The user.
    pub sub: Uuid,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    /// The session (one login).
    pub sid: Uuid,
    pub roles: Vec<String>,
    /// Whether the user's email address was verified when the token was issued.
    #[serde(default)]
    pub email_verified: bool,
    /// An anonymous user (`POST /users/anonymous`) not converted yet.
    #[serde(default)]
    pub is_anonymous: bool,
    /// How the user authenticated (RFC 8176): `["pwd"]`, `["pwd", "otp"]`.
    #[serde(default)]
    pub amr: Vec<String>,
    /// When the user last authenticated, Unix seconds (kept across refreshes).
    #[serde(default)]
    pub auth_time: i64,
}

impl Claims {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Whether the user authenticated with `method` (RFC 8176: `pwd`, `otp`).
    pub fn has_factor(&self, method: &str) -> bool {
        self.amr.iter().any(|m| m == method)
    }

    /// RFC 9470: `Err` unless the user authenticated with a second factor (`otp`).
    pub fn require_mfa(&self) -> Result<(), StepUpRequired> {
        if self.has_factor("otp") {
            Ok(())
        } else {
            Err(StepUpRequired::Mfa)
        }
    }

    /// RFC 9470: `Err` unless the user authenticated at most `max_age` ago (a refresh
    /// keeps the login's `auth_time`; only a login or a reauthentication renews it).
    pub fn require_recent_auth(&self, max_age: Duration) -> Result<(), StepUpRequired> {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        if now - self.auth_time <= max_age.as_secs() as i64 {
            Ok(())
        } else {
            Err(StepUpRequired::MaxAge(max_age.as_secs()))
        }
    }

    /// Issue time in Unix milliseconds: Tessera's `jti` is a UUIDv7 carrying it. Any
    /// other `jti` counts as issued at the start of its `iat` second.
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

/// What a route wanted beyond a valid token (RFC 9470 step-up): answer 401 with
/// [`StepUpRequired::www_authenticate`] (the `actix` feature's `ResponseError` does),
/// so the client reauthenticates at Tessera (`POST /me/reauthenticate`) and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StepUpRequired {
    /// The user authenticated longer ago than this many seconds.
    #[error("the authentication is older than {0} seconds")]
    MaxAge(u64),
    /// The user did not authenticate with a second factor (`otp` in `amr`).
    #[error("the authentication lacks a second factor")]
    Mfa,
}

impl StepUpRequired {
    /// The `WWW-Authenticate` value of the 401, as Tessera itself sends it.
    pub fn www_authenticate(&self) -> String {
        let wanted = match self {
            StepUpRequired::MaxAge(secs) => format!("max_age={secs}"),
            StepUpRequired::Mfa => r#"acr_values="mfa""#.to_owned(),
        };
        format!(r#"Bearer error="insufficient_user_authentication", {wanted}"#)
    }
}

/// Why a token was refused. An API should answer 401 for all of these but
/// [`VerifyError::KeysUnavailable`] and [`VerifyError::RevocationUnavailable`] (503),
/// and may log the kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("token is not a well-formed JWS")]
    Malformed,
    #[error("token header typ is not at+jwt")]
    WrongType,
    #[error("token has no kid, or one the issuer does not publish")]
    UnknownKey,
    #[error("token alg does not match its key's algorithm")]
    WrongAlgorithm,
    #[error("signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token was issued by another issuer")]
    WrongIssuer,
    #[error("token is meant for another audience")]
    WrongAudience,
    #[error("token lacks a required claim or has a malformed one")]
    MissingClaim,
    #[error("token has been revoked")]
    Revoked,
    #[error("the issuer's keys could not be fetched")]
    KeysUnavailable,
    #[error("revocation state is not current (Redis unreachable) and the policy is fail-closed")]
    RevocationUnavailable,
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// How to verify. `Config::new(issuer, audience)` and adjust.
#[derive(Debug, Clone)]
pub struct Config {
    /// Must equal the token's `iss`; also where the metadata document is looked up.
    pub issuer: String,
    /// Must equal the token's `aud`.
    pub audience: String,
    /// The JWKS URL; `None`: `jwks_uri` from `{issuer}/.well-known/oauth-authorization-server`.
    pub jwks_url: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// At most one JWKS fetch per this interval for unknown `kid`s (and after failures).
    pub refetch_interval: Duration,
    /// Cache lifetime when the JWKS response has no `Cache-Control: max-age`.
    pub default_max_age: Duration,
    /// Timeout of one JWKS or metadata request.
    pub http_timeout: Duration,
    pub revocation: Option<RevocationConfig>,
}

impl Config {
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Config {
            issuer: issuer.into(),
            audience: audience.into(),
            jwks_url: None,
            leeway: Duration::from_secs(30),
            refetch_interval: Duration::from_secs(5),
            default_max_age: Duration::from_secs(300),
            http_timeout: Duration::from_secs(5),
            revocation: None,
        }
    }
}

/// Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    keys: KeySource,
    revocations: Option<Arc<Revocations>>,
}

#[derive(Deserialize)]
struct JoseHeader {
    alg: Option<String>,
    kid: Option<String>,
    typ: Option<String>,
}

impl Verifier {
    /// Keys are fetched on first use. With a revocation config, a background task
    /// (needs a Tokio runtime) subscribes to the server's revocations.
    pub fn new(config: Config) -> Result<Self, VerifyError> {
        let keys = KeySource::remote(&config)?;
        Self::build(config, keys)
    }

    /// Keys given up front and never fetched (offline use, tests, benchmarks).
    pub fn with_keys(config: Config, jwks: &JwkSet) -> Result<Self, VerifyError> {
        let keys = KeySource::fixed(jwks);
        Self::build(config, keys)
    }

    fn build(config: Config, keys: KeySource) -> Result<Self, VerifyError> {
        let revocations = match &config.revocation {
            Some(rc) => Some(Revocations::start(rc.clone())?),
            None => None,
        };
        Ok(Verifier {
            inner: Arc::new(Inner {
                config,
                keys,
                revocations,
            }),
        })
    }

    /// Waits until the revocation set has been loaded from Redis once (or `timeout`
    /// passes; returns whether it is ready). Without revocation: at once, true.
    pub async fn ready(&self, timeout: Duration) -> bool {
        match &self.inner.revocations {
            Some(r) => r.wait_synced(timeout).await,
            None => true,
        }
    }

    /// How many JWKS (and metadata) fetches this verifier has made.
    pub fn jwks_fetches(&self) -> u64 {
        self.inner.keys.fetches()
    }

    /// Verifies a token, fetching keys if needed (an unknown `kid`, an expired cache).
    pub async fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        let header = parse_header(token)?;
        let kid = header.kid.as_deref().ok_or(VerifyError::UnknownKey)?;
        if self.inner.keys.get(kid).is_none() || self.inner.keys.is_stale() {
            self.inner.keys.refresh().await;
        }
        self.verify_with_header(token, &header)
    }

    /// Verifies a token with the keys at hand, never waiting on the network.
    pub fn verify_local(&self, token: &str) -> Result<Claims, VerifyError> {
        let header = parse_header(token)?;
        self.verify_with_header(token, &header)
    }

    fn verify_with_header(&self, token: &str, header: &JoseHeader) -> Result<Claims, VerifyError> {
        let kid = header.kid.as_deref().ok_or(VerifyError::UnknownKey)?;
        let key = match self.inner.keys.get(kid) {
            Some(key) => key,
            None if self.inner.keys.never_loaded() => return Err(VerifyError::KeysUnavailable),
            None => return Err(VerifyError::UnknownKey),
        };
        let alg = header
            .alg
            .as_deref()
            .and_then(|a| a.parse::<jsonwebtoken::Algorithm>().ok());
        if alg != Some(key.alg) {
            return Err(VerifyError::WrongAlgorithm);
        }
        let c = &self.inner.config;
        let mut validation = Validation::new(key.alg);
        validation.leeway = c.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&c.issuer]);
        validation.set_audience(&[&c.audience]);
        validation.set_required_spec_claims(&["exp", "iat", "nbf", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(|e| classify(e.kind()))?
            .claims;
        if let Some(revocations) = &self.inner.revocations {
            revocations.check(&claims)?;
        }
        Ok(claims)
    }
}

fn parse_header(token: &str) -> Result<JoseHeader, VerifyError> {
    if token.len() > 8192 || token.split('.').count() != 3 {
        return Err(VerifyError::Malformed);
    }
    let encoded = token.split('.').next().unwrap_or_default();
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| VerifyError::Malformed)?;
    let header: JoseHeader = serde_json::from_slice(&bytes).map_err(|_| VerifyError::Malformed)?;
    let typ_ok = header.typ.as_deref().is_some_and(|t| {
        t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt")
    });
    if !typ_ok {
        return Err(VerifyError::WrongType);
    }
    Ok(header)
}

fn classify(kind: &ErrorKind) -> VerifyError {
    match kind {
        ErrorKind::ExpiredSignature => VerifyError::Expired,
        ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
        ErrorKind::InvalidIssuer => VerifyError::WrongIssuer,
        ErrorKind::InvalidAudience => VerifyError::WrongAudience,
        ErrorKind::InvalidSignature => VerifyError::BadSignature,
        ErrorKind::InvalidAlgorithm => VerifyError::WrongAlgorithm,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => VerifyError::MissingClaim,
        _ => VerifyError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(header: &str) -> String {
        format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode(header))
    }

    #[test]
    fn headers_are_checked_before_any_key_lookup() {
        assert_eq!(parse_header("abc").err(), Some(VerifyError::Malformed));
        assert_eq!(parse_header("a.b.c").err(), Some(VerifyError::Malformed));
        let jwt = token(r#"{"alg":"ES256","kid":"k","typ":"JWT"}"#);
        assert_eq!(parse_header(&jwt).err(), Some(VerifyError::WrongType));
        let at = token(r#"{"alg":"ES256","kid":"k","typ":"at+jwt"}"#);
        assert_eq!(parse_header(&at).unwrap().kid.as_deref(), Some("k"));
    }

    fn claims() -> Claims {
        Claims {
            iss: String::new(),
            sub: Uuid::nil(),
            aud: String::new(),
            exp: 0,
            iat: 7,
            nbf: 0,
            jti: Uuid::new_v4().to_string(),
            sid: Uuid::nil(),
            roles: vec![],
            email_verified: false,
            is_anonymous: false,
            amr: vec![],
            auth_time: 0,
        }
    }

    #[test]
    fn issue_time_comes_from_a_v7_jti() {
        let mut c = claims();
        assert_eq!(c.issued_at_ms(), 7000);
        c.jti = Uuid::now_v7().to_string();
        assert!(c.issued_at_ms() > 1_700_000_000_000);
    }

    #[test]
    fn step_up_needs_otp_or_a_recent_authentication() {
        let mut c = claims();
        c.amr = vec!["pwd".into()];
        assert_eq!(c.require_mfa(), Err(StepUpRequired::Mfa));
        assert_eq!(
            StepUpRequired::Mfa.www_authenticate(),
            r#"Bearer error="insufficient_user_authentication", acr_values="mfa""#
        );
        c.amr.push("otp".into());
        assert_eq!(c.require_mfa(), Ok(()));

        let now = jsonwebtoken::get_current_timestamp() as i64;
        let ten_minutes = Duration::from_secs(600);
        c.auth_time = now - 601;
        assert_eq!(
            c.require_recent_auth(ten_minutes),
            Err(StepUpRequired::MaxAge(600))
        );
        assert_eq!(
            StepUpRequired::MaxAge(600).www_authenticate(),
            r#"Bearer error="insufficient_user_authentication", max_age=600"#
        );
        c.auth_time = now - 5;
        assert_eq!(c.require_recent_auth(ten_minutes), Ok(()));
    }
}
