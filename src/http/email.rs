//! Emailed links: `POST /email/verification` (send a verification link),
//! `POST /email/verify` (use one), `POST /password/forgot` (send a reset link) and
//! `POST /password/reset` (use one), `PUT /me/email` (ask to change the address) and
//! `POST /email/change/confirm` (use the new address's link).

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::extract::{Authenticated, Caller, Json};
use super::{AppState, UserView, device_token};
use crate::domain::{Email, Password};
use crate::error::ApiError;

/// Runs `work` once the answer is on its way: a moment later, so that the work (a
/// lookup, and for an account a token and its message) does not compete with writing
/// the answer, whose timing must not depend on whether the account exists.
fn after_the_answer(work: impl std::future::Future<Output = ()> + Send + 'static) {
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        work.await;
    });
}

#[derive(Deserialize)]
pub struct EmailRequest {
    email: String,
}

/// 202 whatever the account's state (unknown, verified, or now sent), at once: the work
/// runs after the answer, so neither its body nor its timing tells them apart.
pub async fn request_verification(
    state: web::Data<AppState>,
    caller: Caller,
    Json(body): Json<EmailRequest>,
) -> Result<HttpResponse, ApiError> {
    let email = Email::parse(&body.email).map_err(|e| ApiError::InvalidRequest(e.into()))?;
    state.auth.check_mail_throttle(caller.ip, &email)?;
    let detached = state.clone();
    after_the_answer(async move {
        if let Err(e) = detached.auth.send_verification(&email, &caller.info).await {
            tracing::warn!(error = %e, "a verification link could not be issued");
        }
    });
    Ok(HttpResponse::Accepted().json(json!({})))
}

#[derive(Deserialize)]
pub struct TokenRequest {
    token: String,
}

pub async fn verify(
    state: web::Data<AppState>,
    caller: Caller,
    Json(body): Json<TokenRequest>,
) -> Result<HttpResponse, ApiError> {
    state.auth.verify_email(&body.token, &caller.info).await?;
    Ok(HttpResponse::Ok().json(json!({"email_verified": true})))
}

/// 202 whatever the account's state, at once (see [`request_verification`]).
pub async fn forgot_password(
    state: web::Data<AppState>,
    caller: Caller,
    Json(body): Json<EmailRequest>,
) -> Result<HttpResponse, ApiError> {
    let email = Email::parse(&body.email).map_err(|e| ApiError::InvalidRequest(e.into()))?;
    state.auth.check_mail_throttle(caller.ip, &email)?;
    let detached = state.clone();
    after_the_answer(async move {
        if let Err(e) = detached
            .auth
            .send_password_reset(&email, &caller.info)
            .await
        {
            tracing::warn!(error = %e, "a password reset link could not be issued");
        }
    });
    Ok(HttpResponse::Accepted().json(json!({})))
}

#[derive(Deserialize)]
pub struct ResetRequest {
    token: String,
    new_password: String,
}

pub async fn reset_password(
    state: web::Data<AppState>,
    caller: Caller,
    Json(body): Json<ResetRequest>,
) -> Result<HttpResponse, ApiError> {
    let password =
        Password::parse_new(body.new_password).map_err(|e| ApiError::InvalidRequest(e.into()))?;
    state
        .auth
        .reset_password(&body.token, password, caller.ip, &caller.info)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
pub struct EmailChange {
    new_email: String,
    password: String,
    /// The client's device token, counted like a login's (see `POST /login`).
    device_token: Option<String>,
}

pub async fn change_email(
    state: web::Data<AppState>,
    caller: Caller,
    Authenticated(claims): Authenticated,
    req: actix_web::HttpRequest,
    Json(body): Json<EmailChange>,
) -> Result<HttpResponse, ApiError> {
    let new_email =
        Email::parse(&body.new_email).map_err(|e| ApiError::InvalidRequest(e.into()))?;
    let password =
        Password::parse_existing(body.password).map_err(|e| ApiError::InvalidRequest(e.into()))?;
    let device = device_token(&state, &req, body.device_token);
    state
        .auth
        .request_email_change(
            &claims,
            new_email,
            password,
            device,
            caller.ip,
            &caller.info,
        )
        .await?;
    Ok(HttpResponse::Accepted().json(json!({})))
}

pub async fn confirm_email_change(
    state: web::Data<AppState>,
    caller: Caller,
    Json(body): Json<TokenRequest>,
) -> Result<HttpResponse, ApiError> {
    let user = state
        .auth
        .confirm_email_change(&body.token, &caller.info)
        .await?;
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .json(UserView::from(user)))
}
