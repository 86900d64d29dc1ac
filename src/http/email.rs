//! Emailed links: `POST /email/verification` (send a verification link) and
//! `POST /email/verify` (use one).

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::extract::{Caller, Json};
use crate::domain::Email;
use crate::error::ApiError;

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
    tokio::spawn(async move {
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
