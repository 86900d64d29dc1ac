//! HTTP layer: one module per resource. Handlers parse input, call the domain
//! ([`crate::auth`]) and map the result; they hold no SQL and no crypto.

pub mod admin;
pub mod auth;
pub mod cookies;
pub mod email;
pub mod extract;
pub mod health;
pub mod metrics;
pub mod mfa;
pub mod openapi;
pub mod sessions;
pub mod token;
pub mod users;
pub mod well_known;

use actix_web::HttpResponse;
use actix_web::http::header;
use serde::Serialize;

use crate::auth::device::DeviceToken;
use crate::auth::session::{AuthService, TokenGrant};

/// What every handler shares (built by [`crate::startup::Application::build`]).
pub struct AppState {
    pub auth: AuthService,
    pub trusted_proxies: Vec<extract::IpRange>,
    pub introspection_clients: token::IntrospectionClients,
    /// Cookie delivery for browsers: cookie policy and CSRF key.
    pub browser: cookies::BrowserSessions,
    /// Set on SIGTERM: readiness answers 503 while the server drains.
    pub draining: std::sync::atomic::AtomicBool,
}

/// The contract's user object.
#[derive(Serialize)]
pub(crate) struct UserView {
    id: crate::domain::UserId,
    /// `null` for an anonymous user.
    email: Option<String>,
    email_verified: bool,
    roles: Vec<String>,
    disabled: bool,
    created_at: chrono::DateTime<chrono::Utc>,
    last_login_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Anonymous users (`POST /users/anonymous`) hold the role `anonymous` and nothing
    /// else until they register.
    is_anonymous: bool,
}

impl From<crate::store::User> for UserView {
    fn from(user: crate::store::User) -> Self {
        UserView {
            is_anonymous: user.is_anonymous(),
            id: user.id,
            email: user.email,
            email_verified: user.email_verified,
            roles: user.roles,
            disabled: user.disabled,
            created_at: user.created_at,
            last_login_at: user.last_login_at,
        }
    }
}

/// The contract's token response (login, refresh, token).
#[derive(Serialize)]
struct TokenResponse<'a> {
    access_token: &'a str,
    token_type: &'static str,
    expires_in: i64,
    refresh_token: &'a str,
    refresh_token_expires_in: i64,
    session_id: String,
    /// Only after a login (see `crate::auth::device`).
    #[serde(skip_serializing_if = "Option::is_none")]
    device_token: Option<&'a str>,
}

/// Every response carrying a token is marked uncacheable.
pub(crate) fn no_store(
    mut builder: actix_web::HttpResponseBuilder,
) -> actix_web::HttpResponseBuilder {
    builder
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::PRAGMA, "no-cache"));
    builder
}

pub(crate) fn token_response(grant: &TokenGrant) -> HttpResponse {
    token_response_as(HttpResponse::Ok(), grant)
}

/// The token response with another status (201 for a new anonymous user).
pub(crate) fn token_response_as(
    status: actix_web::HttpResponseBuilder,
    grant: &TokenGrant,
) -> HttpResponse {
    no_store(status).json(TokenResponse {
        access_token: &grant.access_token,
        token_type: "Bearer",
        expires_in: grant.expires_in,
        refresh_token: grant.refresh_token.expose(),
        refresh_token_expires_in: grant.refresh_token_expires_in,
        session_id: grant.session_id.to_string(),
        device_token: grant.device_token.as_ref().map(|d| d.expose()),
    })
}

/// The device token of a request: from its body, or else from the browser's device
/// cookie. One that cannot have been issued counts as absent (the login is then a new
/// device's), so a stale or mangled value never turns a login into an error.
pub(crate) fn device_token(
    state: &AppState,
    req: &actix_web::HttpRequest,
    body: Option<String>,
) -> Option<DeviceToken> {
    body.or_else(|| state.browser.device_cookie(req))
        .as_deref()
        .and_then(DeviceToken::parse)
}
