//! The second factor: `POST /me/mfa/totp` (enroll), `POST /me/mfa/totp/confirm`,
//! `DELETE /me/mfa/totp`, and `DELETE /admin/users/{id}/mfa` (see [`crate::auth::mfa`]);
//! and step-up, `POST /me/reauthenticate` (see [`crate::auth::step_up`]).

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::auth::second_factor;
use super::cookies::session_in;
use super::extract::{Admin, Authenticated, Caller, Json};
use super::sessions::path_uuid;
use super::{AppState, device_token, no_store, token_response};
use crate::domain::{Password, UserId};
use crate::error::ApiError;

pub async fn enroll(
    state: web::Data<AppState>,
    caller: Caller,
    Authenticated(claims): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let enrollment = state.auth.start_totp(&claims, &caller.info).await?;
    Ok(no_store(HttpResponse::Ok()).json(json!({
        "secret": enrollment.secret,
        "otpauth_uri": enrollment.otpauth_uri,
        "qr_svg": enrollment.qr_svg,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confirm {
    code: String,
}

pub async fn confirm(
    state: web::Data<AppState>,
    caller: Caller,
    Authenticated(claims): Authenticated,
    Json(body): Json<Confirm>,
) -> Result<HttpResponse, ApiError> {
    let codes = state
        .auth
        .confirm_totp(&claims, &body.code, &caller.info)
        .await?;
    Ok(no_store(HttpResponse::Ok()).json(json!({ "recovery_codes": codes })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Remove {
    password: String,
    code: Option<String>,
    recovery_code: Option<String>,
    /// The client's device token, counted like a login's (see `POST /login`).
    device_token: Option<String>,
}

pub async fn remove(
    state: web::Data<AppState>,
    req: HttpRequest,
    caller: Caller,
    Authenticated(claims): Authenticated,
    Json(body): Json<Remove>,
) -> Result<HttpResponse, ApiError> {
    let password = Password::parse_existing(body.password)
        .map_err(|e| ApiError::InvalidRequest(format!("password: {e}")))?;
    let factor = second_factor(body.code, body.recovery_code)?;
    state
        .auth
        .remove_totp(
            &claims,
            password,
            factor,
            device_token(&state, &req, body.device_token),
            caller.ip,
            &caller.info,
        )
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reauthenticate {
    password: String,
    code: Option<String>,
    recovery_code: Option<String>,
    /// The client's device token, counted like a login's (see `POST /login`).
    device_token: Option<String>,
}

/// `POST /me/reauthenticate`: a fresh token response for the caller's session, with a
/// new `auth_time`. A browser whose refresh cookie is this session's gets it by cookie
/// delivery (the new refresh token replaces the cookie); any other client in the body.
pub async fn reauthenticate(
    state: web::Data<AppState>,
    req: HttpRequest,
    caller: Caller,
    Authenticated(claims): Authenticated,
    Json(body): Json<Reauthenticate>,
) -> Result<HttpResponse, ApiError> {
    let password = Password::parse_existing(body.password)
        .map_err(|e| ApiError::InvalidRequest(format!("password: {e}")))?;
    let factor = match (body.code, body.recovery_code) {
        (None, None) => None,
        (code, recovery_code) => Some(second_factor(code, recovery_code)?),
    };
    let cookie_session = state
        .browser
        .refresh_cookie(&req)
        .as_deref()
        .and_then(session_in);
    let grant = state
        .auth
        .reauthenticate(
            &claims,
            password,
            factor,
            device_token(&state, &req, body.device_token),
            caller.ip,
            &caller.info,
        )
        .await?;
    Ok(if cookie_session == Some(claims.sid) {
        state.browser.token_response(&grant)
    } else {
        token_response(&grant)
    })
}

pub async fn admin_remove(
    Admin(admin): Admin,
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user = UserId(path_uuid(&id)?);
    state
        .auth
        .admin_remove_totp(&admin, user, &caller.info)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
