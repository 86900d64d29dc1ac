//! One error type for every handler, rendered as the contract's error bodies.
//!
//! The body is always `{"error", "error_description"}` (plus `error_reason` for refresh
//! failures). Internal causes are logged with their chain and never shown: the client
//! sees a fixed description chosen here, not `err.to_string()` of a database error.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::store::{StoreError, TokenRefusal};

/// Why a refresh token was refused (`error_reason` on `invalid_grant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantFailure {
    Reused,
    Revoked,
    Expired,
    IdleExpired,
    Unknown,
    /// `sessions.bind_user_agent`: the refresh came from another client than the login.
    ClientChanged,
}

impl GrantFailure {
    /// The contract's `error_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantFailure::Reused => "reused",
            GrantFailure::Revoked => "revoked",
            GrantFailure::Expired => "expired",
            GrantFailure::IdleExpired => "idle_expired",
            GrantFailure::Unknown => "unknown",
            GrantFailure::ClientChanged => "client_changed",
        }
    }
}

/// What a step-up (RFC 9470) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepUp {
    /// An authentication at most this many seconds old (`max_age`).
    MaxAge(u64),
    /// An authentication with a second factor (`acr_values="mfa"`).
    Mfa,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("body too large")]
    PayloadTooLarge,
    #[error("invalid grant: {0:?}")]
    InvalidGrant(GrantFailure),
    /// An emailed token (a link's) that cannot be used: `invalid_grant` with its reason.
    #[error("invalid email token: {0:?}")]
    InvalidEmailToken(TokenRefusal),
    #[error("unsupported grant type")]
    UnsupportedGrantType,
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("invalid token")]
    InvalidToken,
    #[error("invalid client")]
    InvalidClient,
    #[error("insufficient scope")]
    InsufficientScope,
    /// RFC 9470: the token is valid, but its authentication is too old or too weak.
    #[error("insufficient user authentication: {0:?}")]
    InsufficientUserAuthentication(StepUp),
    /// The correct password of an account whose address is not verified, when
    /// `email.verification = required`.
    #[error("email not verified")]
    EmailNotVerified,
    /// A cookie-authenticated request failed the Origin or CSRF check.
    #[error("access denied")]
    AccessDenied,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("conflict")]
    Conflict,
    /// Deleting, disabling or demoting the last enabled admin.
    #[error("last admin")]
    LastAdmin,
    #[error("rate limited; retry after {0}s")]
    RateLimited(u64),
    /// A backing service is down, or the hashing pool is full; retry after the seconds.
    #[error("unavailable: {0:#}")]
    Unavailable(anyhow::Error, u64),
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_description: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_reason: Option<&'a str>,
}

impl ApiError {
    pub fn unavailable(cause: impl Into<anyhow::Error>) -> Self {
        ApiError::Unavailable(cause.into(), 1)
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) | ApiError::PayloadTooLarge => "invalid_request",
            ApiError::InvalidGrant(_) | ApiError::InvalidEmailToken(_) => "invalid_grant",
            ApiError::UnsupportedGrantType => "unsupported_grant_type",
            ApiError::InvalidCredentials => "invalid_credentials",
            ApiError::InvalidToken => "invalid_token",
            ApiError::InvalidClient => "invalid_client",
            ApiError::InsufficientScope => "insufficient_scope",
            ApiError::InsufficientUserAuthentication(_) => "insufficient_user_authentication",
            ApiError::EmailNotVerified => "email_not_verified",
            ApiError::AccessDenied => "access_denied",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "invalid_request",
            ApiError::Conflict | ApiError::LastAdmin => "conflict",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::Unavailable(..) => "temporarily_unavailable",
            ApiError::Internal(_) => "server_error",
        }
    }

    fn description(&self) -> &str {
        match self {
            ApiError::InvalidRequest(msg) => msg,
            ApiError::PayloadTooLarge => "request body is larger than 64 KiB",
            ApiError::InvalidGrant(GrantFailure::Reused) => {
                "refresh token was already used; the session has been revoked"
            }
            ApiError::InvalidGrant(GrantFailure::Revoked) => "session has been revoked",
            ApiError::InvalidGrant(GrantFailure::Expired) => "session has expired",
            ApiError::InvalidGrant(GrantFailure::IdleExpired) => {
                "session expired after a period of inactivity"
            }
            ApiError::InvalidGrant(GrantFailure::Unknown) => "refresh token is not valid",
            ApiError::InvalidGrant(GrantFailure::ClientChanged) => {
                "the refresh came from another client than the login; the session has ended"
            }
            ApiError::InvalidEmailToken(TokenRefusal::Unknown) => {
                "this link is not valid (a newer one may have been sent); ask for a new one"
            }
            ApiError::InvalidEmailToken(TokenRefusal::Used) => "this link was already used",
            ApiError::InvalidEmailToken(TokenRefusal::Expired) => {
                "this link has expired; ask for a new one"
            }
            ApiError::UnsupportedGrantType => "only grant_type=refresh_token is supported",
            ApiError::InvalidCredentials => "invalid email or password",
            ApiError::InvalidToken => "access token is missing, invalid, expired or revoked",
            ApiError::InvalidClient => "client authentication failed",
            ApiError::InsufficientScope => "not allowed for this token",
            ApiError::InsufficientUserAuthentication(StepUp::MaxAge(_)) => {
                "this needs a recent authentication: POST /me/reauthenticate, then retry with \
                 the new access token"
            }
            ApiError::InsufficientUserAuthentication(StepUp::Mfa) => {
                "this needs an authentication with a second factor: log in (or POST \
                 /me/reauthenticate) with a code"
            }
            ApiError::EmailNotVerified => {
                "this account's email address is not verified yet; open the link sent to it, \
                 or ask for a new one"
            }
            ApiError::AccessDenied => {
                "a request authenticated by cookie needs an allowed Origin and the \
                 session's X-CSRF-Token"
            }
            ApiError::NotFound => "not found",
            ApiError::MethodNotAllowed => "method not allowed on this resource",
            ApiError::Conflict => "an account with this email already exists",
            ApiError::LastAdmin => "this is the last enabled admin: make another user admin first",
            ApiError::RateLimited(_) => "too many attempts; retry later",
            ApiError::Unavailable(..) => "service temporarily unavailable; retry later",
            ApiError::Internal(_) => "internal error",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_)
            | ApiError::InvalidGrant(_)
            | ApiError::InvalidEmailToken(_)
            | ApiError::UnsupportedGrantType => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InvalidCredentials
            | ApiError::InvalidToken
            | ApiError::InvalidClient
            | ApiError::InsufficientUserAuthentication(_) => StatusCode::UNAUTHORIZED,
            ApiError::InsufficientScope | ApiError::AccessDenied | ApiError::EmailNotVerified => {
                StatusCode::FORBIDDEN
            }
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict | ApiError::LastAdmin => StatusCode::CONFLICT,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            ApiError::Unavailable(cause, _) => {
                tracing::warn!(error = %format!("{cause:#}"), "backing service unavailable")
            }
            ApiError::Internal(cause) => tracing::error!(error = ?cause, "internal error"),
            _ => {}
        }
        let mut res = HttpResponse::build(self.status_code());
        res.insert_header((header::CACHE_CONTROL, "no-store"));
        match self {
            ApiError::InvalidToken => {
                res.insert_header((header::WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#));
            }
            ApiError::InvalidClient => {
                res.insert_header((header::WWW_AUTHENTICATE, r#"Basic realm="tessera""#));
            }
            ApiError::InsufficientUserAuthentication(step_up) => {
                let wanted = match step_up {
                    StepUp::MaxAge(secs) => format!("max_age={secs}"),
                    StepUp::Mfa => r#"acr_values="mfa""#.to_owned(),
                };
                res.insert_header((
                    header::WWW_AUTHENTICATE,
                    format!(r#"Bearer error="insufficient_user_authentication", {wanted}"#),
                ));
            }
            ApiError::RateLimited(secs) | ApiError::Unavailable(_, secs) => {
                res.insert_header((header::RETRY_AFTER, secs.to_string()));
            }
            _ => {}
        }
        let reason = match self {
            ApiError::InvalidGrant(reason) => Some(reason.as_str()),
            ApiError::InvalidEmailToken(refusal) => Some(match refusal {
                TokenRefusal::Unknown => "unknown",
                TokenRefusal::Used => "used",
                TokenRefusal::Expired => "expired",
            }),
            _ => None,
        };
        res.json(ErrorBody {
            error: self.code(),
            error_description: self.description(),
            error_reason: reason,
        })
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Conflict => ApiError::Conflict,
            StoreError::LastAdmin => ApiError::LastAdmin,
            StoreError::Unavailable(cause) => ApiError::unavailable(cause),
            StoreError::Other(cause) => ApiError::Internal(cause),
        }
    }
}
