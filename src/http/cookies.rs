//! Browser sessions (cookie delivery, `../shared/api.md` "Browser sessions"): the
//! refresh token in an `HttpOnly` cookie that JavaScript never sees, a CSRF token bound
//! to the session, and the two checks every cookie-authenticated request passes.
//!
//! - `__Host-tessera_refresh`: the refresh token; `HttpOnly; Secure; SameSite=Strict;
//!   Path=/`, host-only; `Max-Age` = the session's remaining absolute lifetime when the
//!   login asked to be remembered, none (gone with the browser) otherwise.
//! - `__Host-tessera_csrf` (or `__Secure-tessera_csrf` with `Domain` = `cookies.domain`):
//!   the session's CSRF token, readable by the page so a reload finds it; same lifetime.
//! - `__Host-tessera_device`: the known-device token (`login.device_ttl_secs`).
//!
//! A request that authenticates with the refresh cookie must send an `Origin` that is
//! the issuer's or one of `server.cors_allowed_origins`, and `X-CSRF-Token` equal to
//! the session's token; otherwise 403 `access_denied` and the session is untouched.
//! `SameSite=Strict` already keeps other sites' requests from carrying the cookie;
//! the checks are the defence for when it does not (an old browser, a sibling subdomain
//! that is same-site but not trusted).
//!
//! `cookies.secure = false` (plain-HTTP development) drops `Secure` and the name
//! prefixes, which browsers only accept over HTTPS.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse};
use serde::Serialize;

use super::no_store;
use crate::auth::csrf::CsrfKey;
use crate::auth::refresh_token::RefreshToken;
use crate::auth::session::TokenGrant;
use crate::config::Settings;
use crate::domain::{SessionId, origin_of};
use crate::error::ApiError;

/// How a login wants its refresh token (`token_delivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// In the JSON body (mobile apps, OAuth clients): the default.
    Body,
    /// In an `HttpOnly` cookie, with a CSRF token (SPAs).
    Cookie,
}

impl Delivery {
    pub fn parse(value: Option<&str>) -> Result<Self, ApiError> {
        match value {
            None | Some("body") => Ok(Delivery::Body),
            Some("cookie") => Ok(Delivery::Cookie),
            Some(_) => Err(ApiError::InvalidRequest(
                "token_delivery must be \"body\" or \"cookie\"".into(),
            )),
        }
    }
}

/// The token response of cookie delivery: no `refresh_token`, a `csrf_token`.
#[derive(Serialize)]
struct CookieTokenResponse<'a> {
    access_token: &'a str,
    token_type: &'static str,
    expires_in: i64,
    refresh_token_expires_in: i64,
    session_id: String,
    csrf_token: String,
}

/// The cookie policy and the CSRF key (built once from the settings).
pub struct BrowserSessions {
    secure: bool,
    /// `cookies.domain`, for the CSRF cookie only.
    domain: Option<String>,
    /// Origins whose cookie-authenticated requests are accepted.
    origins: Vec<String>,
    csrf: CsrfKey,
    device_ttl_secs: u64,
}

impl BrowserSessions {
    pub fn new(settings: &Settings, csrf_secret: &[u8]) -> Self {
        let mut origins: Vec<String> = settings.server.cors_allowed_origins.clone();
        origins.extend(origin_of(&settings.tokens.issuer));
        let domain = Some(settings.cookies.domain.trim().to_owned()).filter(|d| !d.is_empty());
        BrowserSessions {
            secure: settings.cookies.secure,
            domain,
            origins,
            csrf: CsrfKey::new(csrf_secret),
            device_ttl_secs: settings.login.device_ttl_secs,
        }
    }

    fn refresh_name(&self) -> &'static str {
        if self.secure {
            "__Host-tessera_refresh"
        } else {
            "tessera_refresh"
        }
    }

    fn csrf_name(&self) -> &'static str {
        match (self.secure, self.domain.is_some()) {
            (true, false) => "__Host-tessera_csrf",
            (true, true) => "__Secure-tessera_csrf",
            (false, _) => "tessera_csrf",
        }
    }

    fn device_name(&self) -> &'static str {
        if self.secure {
            "__Host-tessera_device"
        } else {
            "tessera_device"
        }
    }

    /// The refresh token from the cookie, if the request carries one.
    pub fn refresh_cookie(&self, req: &HttpRequest) -> Option<String> {
        cookie(req, self.refresh_name())
    }

    /// The known-device token from the cookie, if the request carries one.
    pub fn device_cookie(&self, req: &HttpRequest) -> Option<String> {
        cookie(req, self.device_name())
    }

    /// The `Origin` check alone: present, and the issuer's or an allowed one.
    pub fn check_origin(&self, req: &HttpRequest) -> Result<(), ApiError> {
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .ok_or(ApiError::AccessDenied)?;
        if self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
            Ok(())
        } else {
            Err(ApiError::AccessDenied)
        }
    }

    /// The second check: `X-CSRF-Token` equal to the token of `session`, the session
    /// the refresh cookie names (see [`session_in`]).
    pub fn check_csrf(&self, req: &HttpRequest, session: SessionId) -> Result<(), ApiError> {
        let presented = req
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::AccessDenied)?;
        if self.csrf.verify(session, presented) {
            Ok(())
        } else {
            Err(ApiError::AccessDenied)
        }
    }

    /// The token response of a cookie login or refresh: the refresh token and the CSRF
    /// token set as cookies (and the device token, after a login), the body without
    /// the refresh token.
    pub fn token_response(&self, grant: &TokenGrant) -> HttpResponse {
        let csrf_token = self.csrf.token(grant.session_id);
        let max_age = grant.remember_me.then_some(grant.session_expires_in);
        let mut res = no_store(HttpResponse::Ok());
        res.append_header((
            header::SET_COOKIE,
            self.set_cookie(
                self.refresh_name(),
                grant.refresh_token.expose(),
                max_age,
                true,
            ),
        ));
        res.append_header((
            header::SET_COOKIE,
            self.set_cookie(self.csrf_name(), &csrf_token, max_age, false),
        ));
        if let Some(device) = &grant.device_token {
            let ttl = self.device_ttl_secs as i64;
            res.append_header((
                header::SET_COOKIE,
                self.set_cookie(self.device_name(), device.expose(), Some(ttl), true),
            ));
        }
        res.json(CookieTokenResponse {
            access_token: &grant.access_token,
            token_type: "Bearer",
            expires_in: grant.expires_in,
            refresh_token_expires_in: grant.refresh_token_expires_in,
            session_id: grant.session_id.to_string(),
            csrf_token,
        })
    }

    /// Adds the headers that clear the refresh and CSRF cookies (the device cookie
    /// stays: ending a session does not forget the device).
    pub fn clear(&self, res: &mut HttpResponse) {
        for (name, http_only) in [(self.refresh_name(), true), (self.csrf_name(), false)] {
            if let Ok(value) = HeaderValue::from_str(&self.set_cookie(name, "", Some(0), http_only))
            {
                res.headers_mut().append(header::SET_COOKIE, value);
            }
        }
    }

    /// One `Set-Cookie` value. Values are base64url, so nothing needs quoting.
    fn set_cookie(&self, name: &str, value: &str, max_age: Option<i64>, http_only: bool) -> String {
        let mut out = format!("{name}={value}; Path=/");
        if let Some(secs) = max_age {
            out.push_str(&format!("; Max-Age={}", secs.max(0)));
        }
        // Only the CSRF cookie is shared with a sibling subdomain.
        if name == self.csrf_name()
            && let Some(domain) = &self.domain
        {
            out.push_str(&format!("; Domain={domain}"));
        }
        if http_only {
            out.push_str("; HttpOnly");
        }
        if self.secure {
            out.push_str("; Secure");
        }
        out.push_str("; SameSite=Strict");
        out
    }
}

/// The session a browser's refresh token names in itself (cookie sessions always have
/// chain tokens, which carry their session id), so the CSRF check needs no database
/// read. `None` for anything Tessera does not issue to browsers.
pub fn session_in(refresh_token: &str) -> Option<SessionId> {
    RefreshToken::parse(refresh_token)
        .and_then(|t| t.chain())
        .map(|c| c.session)
}

/// The value of the first cookie named `name` in the request's `Cookie` headers.
fn cookie(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}
