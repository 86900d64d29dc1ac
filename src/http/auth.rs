//! `POST /login` and `POST /logout`.

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::AppState;
use super::extract::{Authenticated, Caller, Json, OptionalJson};
use super::{device_token, token_response};
use crate::auth::session::LogoutScope;
use crate::domain::{Email, Password};
use crate::error::ApiError;

#[derive(Deserialize)]
pub struct LoginRequest {
    email: String,
    password: String,
    #[serde(default)]
    remember_me: bool,
    /// The device token of an earlier successful login on this device, if any.
    device_token: Option<String>,
}

pub async fn login(
    state: web::Data<AppState>,
    caller: Caller,
    Json(body): Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    let email = Email::parse(&body.email).map_err(|e| ApiError::InvalidRequest(e.into()))?;
    let password =
        Password::parse_existing(body.password).map_err(|e| ApiError::InvalidRequest(e.into()))?;
    let grant = state
        .auth
        .login(
            email,
            password,
            body.remember_me,
            device_token(body.device_token.as_deref()),
            caller.ip,
            &caller.info,
        )
        .await?;
    Ok(token_response(&grant))
}

#[derive(Deserialize)]
pub struct LogoutRequest {
    scope: Option<String>,
}

pub async fn logout(
    state: web::Data<AppState>,
    caller: Caller,
    Authenticated(claims): Authenticated,
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
    state.auth.logout(&claims, scope, &caller.info).await?;
    Ok(HttpResponse::NoContent().finish())
}
