//! `POST /refresh`, `POST /token` (RFC 6749 section 6), `POST /revoke` (RFC 7009) and
//! `POST /introspect` (RFC 7662).

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::AppState;
use super::cookies::session_in;
use super::extract::{Caller, Form, OptionalJson};
use super::{no_store, token_response};
use crate::auth::throttle::FailureLimiter;
use crate::config::IntrospectionSettings;
use crate::error::{ApiError, GrantFailure};

#[derive(Deserialize)]
pub struct RefreshRequest {
    refresh_token: Option<String>,
}

/// The refresh token from the body, or else from the browser's cookie (with the Origin
/// and CSRF checks); a body token wins over the cookie. A cookie refresh answers with
/// the successor in the cookie, and a refresh that failed for good (any
/// `error_reason` but `unknown`) clears the cookies.
pub async fn refresh(
    state: web::Data<AppState>,
    req: HttpRequest,
    caller: Caller,
    OptionalJson(body): OptionalJson<RefreshRequest>,
) -> Result<HttpResponse, ApiError> {
    if let Some(token) = body.and_then(|b| b.refresh_token) {
        let grant = state.auth.refresh(&token, &caller.info).await?;
        return Ok(token_response(&grant));
    }
    let Some(cookie) = state.browser.refresh_cookie(&req) else {
        return Err(ApiError::InvalidRequest(
            "missing field `refresh_token`".into(),
        ));
    };
    state.browser.check_origin(&req)?;
    let Some(session) = session_in(&cookie) else {
        return Err(ApiError::InvalidGrant(GrantFailure::Unknown));
    };
    state.browser.check_csrf(&req, session)?;
    match state.auth.refresh(&cookie, &caller.info).await {
        Ok(grant) => Ok(state.browser.token_response(&grant)),
        Err(e @ ApiError::InvalidGrant(reason)) if reason != GrantFailure::Unknown => {
            let mut res = e.error_response();
            state.browser.clear(&mut res);
            Ok(res)
        }
        Err(e) => Err(e),
    }
}

#[derive(Deserialize)]
pub struct TokenRequest {
    grant_type: Option<String>,
    refresh_token: Option<String>,
}

pub async fn token(
    state: web::Data<AppState>,
    caller: Caller,
    Form(body): Form<TokenRequest>,
) -> Result<HttpResponse, ApiError> {
    match body.grant_type.as_deref() {
        Some("refresh_token") => {}
        Some(_) => return Err(ApiError::UnsupportedGrantType),
        None => {
            return Err(ApiError::InvalidRequest(
                "missing field `grant_type`".into(),
            ));
        }
    }
    let refresh_token = body
        .refresh_token
        .ok_or_else(|| ApiError::InvalidRequest("missing field `refresh_token`".into()))?;
    let grant = state.auth.refresh(&refresh_token, &caller.info).await?;
    Ok(token_response(&grant))
}

/// `token_type_hint` may be sent (RFC 7009) and is ignored like any other extra field:
/// the two token formats cannot be confused.
#[derive(Deserialize)]
pub struct RevokeRequest {
    token: String,
}

pub async fn revoke(
    state: web::Data<AppState>,
    caller: Caller,
    Form(body): Form<RevokeRequest>,
) -> Result<HttpResponse, ApiError> {
    state.auth.revoke(&body.token, &caller.info).await?;
    Ok(no_store(HttpResponse::Ok()).finish())
}

#[derive(Deserialize)]
pub struct IntrospectRequest {
    token: String,
}

pub async fn introspect(
    state: web::Data<AppState>,
    req: HttpRequest,
    caller: Caller,
    Form(body): Form<IntrospectRequest>,
) -> Result<HttpResponse, ApiError> {
    state
        .introspection_clients
        .authenticate(&req, state.auth.throttle.ip_key(caller.ip))?;
    let body = match state.auth.introspect(&body.token).await? {
        Some(c) => json!({
            "active": true,
            "sub": c.sub, "sid": c.sid, "jti": c.jti, "exp": c.exp, "iat": c.iat, "nbf": c.nbf,
            "iss": c.iss, "aud": c.aud, "roles": c.roles, "email_verified": c.email_verified,
            "is_anonymous": c.is_anonymous, "amr": c.amr, "auth_time": c.auth_time,
            "token_type": "Bearer",
        }),
        None => json!({"active": false}),
    };
    Ok(no_store(HttpResponse::Ok()).json(body))
}

/// Resource servers allowed to introspect, from `introspection.clients`. Secrets are
/// kept only as SHA-256 digests and compared in constant time; an unknown id costs the
/// same comparison as a wrong secret. Failed authentications are limited per client id
/// and per client IP (`introspection.failures_per_minute`), checked before the secret
/// is, so guessing a secret runs at that rate at most.
pub struct IntrospectionClients {
    clients: Vec<(String, [u8; 32])>,
    failures: FailureLimiter,
}

impl IntrospectionClients {
    pub fn from_settings(
        settings: &IntrospectionSettings,
        max_keys: usize,
    ) -> anyhow::Result<Self> {
        let entries = &settings.clients;
        let mut clients = Vec::new();
        for entry in entries {
            let entry = entry.expose_secret();
            let (id, secret) = entry.split_once(':').ok_or_else(|| {
                anyhow::anyhow!("introspection.clients entries must be \"id:secret\"")
            })?;
            let digest = match secret.strip_prefix("sha256:") {
                Some(hex) => decode_hex32(hex).ok_or_else(|| {
                    anyhow::anyhow!("introspection client {id}: sha256: needs 64 hex digits")
                })?,
                None => sha256(secret.as_bytes()),
            };
            clients.push((id.to_owned(), digest));
        }
        Ok(IntrospectionClients {
            clients,
            failures: FailureLimiter::new(settings.failures_per_minute, max_keys),
        })
    }

    /// `Ok` for valid credentials; 429 for a client id or IP that failed too often
    /// (whatever it presents now), else 401 `invalid_client`.
    fn authenticate(&self, req: &HttpRequest, ip: std::net::IpAddr) -> Result<(), ApiError> {
        let credentials = basic_credentials(req);
        let ip_key = format!("ip:{ip}");
        let id_key = credentials.as_ref().map(|(id, _)| format!("id:{id}"));
        let mut keys = vec![ip_key.as_str()];
        keys.extend(id_key.as_deref());
        self.failures.check(&keys).map_err(ApiError::RateLimited)?;
        let valid = credentials.is_some_and(|(id, secret)| {
            let presented = sha256(secret.as_bytes());
            let mut ok = false;
            for (client_id, expected) in &self.clients {
                let id_ok = client_id.as_bytes().ct_eq(id.as_bytes());
                ok |= bool::from(id_ok & expected.ct_eq(&presented));
            }
            ok
        });
        if valid {
            return Ok(());
        }
        tracing::warn!(%ip, "introspection client authentication failed");
        self.failures.failed(&keys);
        Err(ApiError::InvalidClient)
    }
}

fn basic_credentials(req: &HttpRequest) -> Option<(String, String)> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}
