//! `POST /users` (registration), `GET /me` and `PUT /me/password`.

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::device_token;
use super::extract::{Authenticated, Caller, Json, MaybeAuthenticated};
use crate::domain::{Email, Password, SessionId, UserId};
use crate::error::ApiError;

#[derive(Deserialize)]
pub struct RegisterRequest {
    email: String,
    password: String,
}

#[derive(Serialize)]
struct Registered {
    id: UserId,
    email: Option<String>,
    email_verified: bool,
    created_at: DateTime<Utc>,
}

/// `POST /users`: a new user; or, with an anonymous user's Bearer token, that user
/// converted (same id).
pub async fn register(
    state: web::Data<AppState>,
    caller: Caller,
    MaybeAuthenticated(anonymous): MaybeAuthenticated,
    Json(body): Json<RegisterRequest>,
) -> Result<HttpResponse, ApiError> {
    if !state.auth.settings().registration.enabled {
        return Err(ApiError::NotFound);
    }
    let email = Email::parse(&body.email).map_err(|e| ApiError::InvalidRequest(e.into()))?;
    let password =
        Password::parse_new(body.password).map_err(|e| ApiError::InvalidRequest(e.into()))?;
    let user = match anonymous {
        Some(claims) => {
            state
                .auth
                .convert_anonymous(&claims, email, password, caller.ip, &caller.info)
                .await?
        }
        None => {
            state
                .auth
                .register(email, password, caller.ip, &caller.info)
                .await?
        }
    };
    Ok(HttpResponse::Created().json(Registered {
        id: user.id,
        email: user.email,
        email_verified: user.email_verified,
        created_at: user.created_at,
    }))
}

/// `POST /users/anonymous` (no body): a new anonymous user and its first tokens, 201.
pub async fn register_anonymous(
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let grant = state.auth.create_anonymous(caller.ip, &caller.info).await?;
    Ok(super::token_response_as(HttpResponse::Created(), &grant))
}

#[derive(Serialize)]
struct Me<'a> {
    id: UserId,
    /// `null` for an anonymous user.
    email: Option<&'a str>,
    email_verified: bool,
    roles: &'a [String],
    session_id: SessionId,
    /// The second factors the user has on: `["totp"]` or `[]`.
    mfa: &'static [&'static str],
}

pub async fn me(
    state: web::Data<AppState>,
    Authenticated(claims): Authenticated,
) -> Result<HttpResponse, ApiError> {
    // Roles come from the token: it has just passed the denylist, and a role change
    // revokes every earlier token, so they are the user's current roles.
    let profile = state.auth.profile_of(claims.sub, claims.iat).await?;
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .json(Me {
            id: claims.sub,
            email: profile.email.as_deref(),
            email_verified: profile.email_verified,
            roles: &claims.roles,
            session_id: claims.sid,
            mfa: if profile.mfa { &["totp"] } else { &[] },
        }))
}

#[derive(Deserialize)]
pub struct PasswordChange {
    current_password: String,
    new_password: String,
    /// The client's device token, counted like a login's (see `POST /login`).
    device_token: Option<String>,
}

pub async fn change_password(
    state: web::Data<AppState>,
    req: HttpRequest,
    caller: Caller,
    Authenticated(claims): Authenticated,
    Json(body): Json<PasswordChange>,
) -> Result<HttpResponse, ApiError> {
    let current = Password::parse_existing(body.current_password)
        .map_err(|e| ApiError::InvalidRequest(format!("current_password: {e}")))?;
    let new = Password::parse_new(body.new_password)
        .map_err(|e| ApiError::InvalidRequest(format!("new_password: {e}")))?;
    state
        .auth
        .change_password(
            &claims,
            current,
            new,
            device_token(&state, &req, body.device_token),
            caller.ip,
            &caller.info,
        )
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
pub struct DeleteMe {
    password: String,
    /// The client's device token, counted like a login's (see `POST /login`).
    device_token: Option<String>,
}

pub async fn delete_me(
    state: web::Data<AppState>,
    req: HttpRequest,
    caller: Caller,
    Authenticated(claims): Authenticated,
    Json(body): Json<DeleteMe>,
) -> Result<HttpResponse, ApiError> {
    let password = Password::parse_existing(body.password)
        .map_err(|e| ApiError::InvalidRequest(format!("password: {e}")))?;
    state
        .auth
        .delete_own_account(
            &claims,
            password,
            device_token(&state, &req, body.device_token),
            caller.ip,
            &caller.info,
        )
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
