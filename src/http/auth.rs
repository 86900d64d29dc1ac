//! `POST /login` and `POST /logout`, with body or cookie delivery (see [`super::cookies`]).

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::AppState;
use super::cookies::{Delivery, session_in};
use super::extract::{Caller, Json, OptionalJson, bearer_token};
use super::no_store;
use super::{device_token, token_response};
use crate::auth::mfa::SecondFactor;
use crate::auth::session::{LoginOutcome, LogoutScope, TokenGrant};
use crate::domain::{Email, Password};
use crate::error::ApiError;

#[derive(Deserialize)]
pub struct LoginRequest {
    email: String,
    password: String,
    #[serde(default)]
    remember_me: bool,
    /// The device token of an earlier successful login on this device, if any (a
    /// browser sends it as the device cookie instead).
    device_token: Option<String>,
    /// `"body"` (the default) or `"cookie"`.
    token_delivery: Option<String>,
}

pub async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    caller: Caller,
    Json(body): Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    let delivery = Delivery::parse(body.token_delivery.as_deref())?;
    let email = Email::parse(&body.email).map_err(|e| ApiError::InvalidRequest(e.into()))?;
    let password =
        Password::parse_existing(body.password).map_err(|e| ApiError::InvalidRequest(e.into()))?;
    let device = device_token(&state, &req, body.device_token);
    let request = crate::auth::session::LoginRequest {
        email,
        password,
        remember_me: body.remember_me,
        device,
        cookie: delivery == Delivery::Cookie,
    };
    let outcome = state.auth.login(request, caller.ip, &caller.info).await;
    state.auth.metrics.login(match &outcome {
        Ok(LoginOutcome::Tokens(_)) => "ok",
        Ok(LoginOutcome::MfaRequired { .. }) => "mfa_required",
        Err(e) => login_failure(e),
    });
    Ok(match outcome? {
        LoginOutcome::Tokens(grant) => deliver(&state, delivery, &grant),
        LoginOutcome::MfaRequired { mfa_token } => {
            no_store(HttpResponse::Unauthorized()).json(serde_json::json!({
                "error": "mfa_required",
                "error_description": "the password is right; now a code from the \
                                      authenticator app (POST /login/mfa)",
                "mfa_token": mfa_token,
                "methods": ["totp", "recovery_code"],
            }))
        }
    })
}

fn deliver(state: &AppState, delivery: Delivery, grant: &TokenGrant) -> HttpResponse {
    match delivery {
        Delivery::Body => token_response(grant),
        Delivery::Cookie => state.browser.token_response(grant),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginMfaRequest {
    mfa_token: String,
    code: Option<String>,
    recovery_code: Option<String>,
}

/// `POST /login/mfa`: the second step of a login with a second factor; tokens are
/// delivered as the first step asked (body or cookies).
pub async fn login_mfa(
    state: web::Data<AppState>,
    caller: Caller,
    Json(body): Json<LoginMfaRequest>,
) -> Result<HttpResponse, ApiError> {
    let factor = second_factor(body.code, body.recovery_code)?;
    let result = state
        .auth
        .login_mfa(&body.mfa_token, factor, caller.ip, &caller.info)
        .await;
    state.auth.metrics.login(match &result {
        Ok(_) => "ok",
        Err(ApiError::InvalidGrant(_)) => "mfa_expired",
        Err(e) => login_failure(e),
    });
    let (grant, cookie) = result?;
    let delivery = if cookie {
        Delivery::Cookie
    } else {
        Delivery::Body
    };
    Ok(deliver(&state, delivery, &grant))
}

/// The `tessera_logins_total` outcome of a refused login.
fn login_failure(e: &ApiError) -> &'static str {
    match e {
        ApiError::InvalidCredentials => "bad_credentials",
        ApiError::RateLimited(_) => "throttled",
        ApiError::EmailNotVerified => "email_not_verified",
        ApiError::InvalidRequest(_) => "invalid_request",
        _ => "error",
    }
}

/// Exactly one of a code and a recovery code.
pub(crate) fn second_factor(
    code: Option<String>,
    recovery_code: Option<String>,
) -> Result<SecondFactor, ApiError> {
    match (code, recovery_code) {
        (Some(code), None) => Ok(SecondFactor::Code(code)),
        (None, Some(code)) => Ok(SecondFactor::RecoveryCode(code)),
        _ => Err(ApiError::InvalidRequest(
            "give either code or recovery_code".into(),
        )),
    }
}

#[derive(Deserialize)]
pub struct LogoutRequest {
    scope: Option<String>,
}

/// Authenticated by the Bearer token, or else by the refresh cookie (with the Origin
/// and CSRF checks). Either way, when the request carries the refresh cookie of a
/// session that this logout ended, the response clears the cookies.
pub async fn logout(
    state: web::Data<AppState>,
    req: HttpRequest,
    caller: Caller,
    OptionalJson(body): OptionalJson<LogoutRequest>,
) -> Result<HttpResponse, ApiError> {
    let scope = match body.and_then(|b| b.scope).as_deref() {
        None | Some("local") => LogoutScope::Local,
        Some("others") => LogoutScope::Others,
        Some("global") => LogoutScope::Global,
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "scope must be \"local\", \"others\" or \"global\"".into(),
            ));
        }
    };
    let cookie = state.browser.refresh_cookie(&req);
    let cookie_session = cookie.as_deref().and_then(session_in);
    let ended = if let Some(bearer) = bearer_token(&req) {
        let claims = state.auth.authenticate(&bearer).await?;
        state
            .auth
            .logout(claims.sid, claims.sub, scope, &caller.info)
            .await?
    } else if let Some(cookie) = cookie {
        state.browser.check_origin(&req)?;
        let Some(sid) = cookie_session else {
            // Not a token Tessera issues to browsers: nothing to end, just forget it.
            return Ok(cleared(&state));
        };
        state.browser.check_csrf(&req, sid)?;
        match state.auth.session_of(&cookie).await? {
            Some((sid, user, true)) => state.auth.logout(sid, user, scope, &caller.info).await?,
            // An ended session, or one this token no longer speaks for: it can still be
            // (re)ended, but cannot end others.
            Some((sid, user, false)) => {
                state
                    .auth
                    .logout(sid, user, LogoutScope::Local, &caller.info)
                    .await?
            }
            None => return Ok(cleared(&state)),
        }
    } else {
        return Err(ApiError::InvalidToken);
    };
    let mut res = HttpResponse::NoContent().finish();
    if cookie_session.is_some_and(|sid| ended.contains(&sid)) {
        state.browser.clear(&mut res);
    }
    Ok(res)
}

fn cleared(state: &AppState) -> HttpResponse {
    let mut res = HttpResponse::NoContent().finish();
    state.browser.clear(&mut res);
    res
}
