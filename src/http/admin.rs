//! `/admin/*`: user sessions, disabling and roles, the audit trail. Every route takes
//! the [`Admin`] extractor first, so a non-admin gets 403 before anything is parsed.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::extract::{Admin, Caller, Json, Query};
use super::no_store;
use super::sessions::{path_uuid, session_list};
use super::{AppState, UserView};
use crate::auth::admin::parse_roles;
use crate::domain::{Email, Password, UserId};
use crate::error::ApiError;
use crate::store::{AuditCursor, AuditQuery, UserChange};

pub async fn user_sessions(
    Admin(admin): Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user = UserId(path_uuid(&id)?);
    let sessions = state.auth.admin_user_sessions(user).await?;
    Ok(session_list(sessions, admin.sid))
}

pub async fn end_user_sessions(
    Admin(admin): Admin,
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user = UserId(path_uuid(&id)?);
    state
        .auth
        .admin_end_sessions(&admin, user, &caller.info)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    disabled: Option<bool>,
    roles: Option<Vec<String>>,
}

pub async fn update_user(
    Admin(admin): Admin,
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
    Json(patch): Json<UserPatch>,
) -> Result<HttpResponse, ApiError> {
    let user = UserId(path_uuid(&id)?);
    if patch.disabled.is_none() && patch.roles.is_none() {
        return Err(ApiError::InvalidRequest(
            "give \"disabled\" and/or \"roles\"".into(),
        ));
    }
    let roles = patch
        .roles
        .map(parse_roles)
        .transpose()
        .map_err(|e| ApiError::InvalidRequest(e.into()))?;
    let change = UserChange {
        disabled: patch.disabled,
        roles,
    };
    let user = state
        .auth
        .admin_update_user(&admin, user, change, &caller.info)
        .await?;
    Ok(no_store(HttpResponse::Ok()).json(UserView::from(user)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserListParams {
    email: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// Users sorted by email; `email` is a prefix (case-insensitive), `after` the last email
/// of the previous page.
pub async fn list_users(
    Admin(_): Admin,
    state: web::Data<AppState>,
    Query(params): Query<UserListParams>,
) -> Result<HttpResponse, ApiError> {
    let limit = match params.limit {
        None => AUDIT_DEFAULT_LIMIT,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=AUDIT_MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::InvalidRequest("limit must be a number from 1 to 1000".into())
            })?,
    };
    let too_long = |s: &Option<String>| s.as_ref().is_some_and(|s| s.len() > Email::MAX_LEN);
    if too_long(&params.email) || too_long(&params.after) {
        return Err(ApiError::InvalidRequest(
            "email and after are at most 254 characters".into(),
        ));
    }
    let users = state
        .auth
        .admin_list_users(params.email.as_deref(), params.after.as_deref(), limit)
        .await?;
    let users: Vec<UserView> = users.into_iter().map(UserView::from).collect();
    Ok(no_store(HttpResponse::Ok()).json(users))
}

pub async fn get_user(
    Admin(_): Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user = state.auth.admin_get_user(UserId(path_uuid(&id)?)).await?;
    Ok(no_store(HttpResponse::Ok()).json(UserView::from(user)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    email: String,
    roles: Option<Vec<String>>,
    password: Option<String>,
}

pub async fn create_user(
    Admin(admin): Admin,
    state: web::Data<AppState>,
    caller: Caller,
    Json(body): Json<NewUser>,
) -> Result<HttpResponse, ApiError> {
    let email = Email::parse(&body.email).map_err(|e| ApiError::InvalidRequest(e.into()))?;
    let roles = parse_roles(body.roles.unwrap_or_else(|| vec!["user".to_owned()]))
        .map_err(|e| ApiError::InvalidRequest(e.into()))?;
    let password = body
        .password
        .map(Password::parse_new)
        .transpose()
        .map_err(|e| ApiError::InvalidRequest(format!("password: {e}")))?;
    let user = state
        .auth
        .admin_create_user(&admin, email, roles, password, &caller.info)
        .await?;
    Ok(no_store(HttpResponse::Created()).json(UserView::from(user)))
}

pub async fn send_reset(
    Admin(admin): Admin,
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user = UserId(path_uuid(&id)?);
    state
        .auth
        .admin_send_reset(&admin, user, &caller.info)
        .await?;
    Ok(no_store(HttpResponse::Accepted()).json(serde_json::json!({})))
}

pub async fn delete_user(
    Admin(admin): Admin,
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user = UserId(path_uuid(&id)?);
    state
        .auth
        .admin_delete_user(&admin, user, &caller.info)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    user_id: Option<String>,
    limit: Option<String>,
    before: Option<String>,
}

pub const AUDIT_DEFAULT_LIMIT: i64 = 50;
pub const AUDIT_MAX_LIMIT: i64 = 1000;

/// Newest first. Page with `before` = the `id` of the last event of the previous page
/// (or an RFC 3339 time); `user_id` selects events about that user or by them (admin).
pub async fn audit(
    Admin(_): Admin,
    state: web::Data<AppState>,
    Query(params): Query<AuditParams>,
) -> Result<HttpResponse, ApiError> {
    let bad = |what: &str| ApiError::InvalidRequest(what.into());
    let user = params
        .user_id
        .map(|u| uuid::Uuid::parse_str(&u).map(UserId))
        .transpose()
        .map_err(|_| bad("user_id must be a UUID"))?;
    let limit = match params.limit {
        None => AUDIT_DEFAULT_LIMIT,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=AUDIT_MAX_LIMIT).contains(l))
            .ok_or_else(|| bad("limit must be a number from 1 to 1000"))?,
    };
    let before = params
        .before
        .map(|b| match b.parse::<i64>() {
            Ok(id) => Ok(AuditCursor::Id(id)),
            Err(_) => DateTime::parse_from_rfc3339(&b)
                .map(|t| AuditCursor::Time(t.with_timezone(&Utc)))
                .map_err(|_| bad("before must be an event id or an RFC 3339 time")),
        })
        .transpose()?;
    let events = state
        .auth
        .audit_log(&AuditQuery {
            user,
            before,
            limit,
        })
        .await?;
    Ok(no_store(HttpResponse::Ok()).json(events))
}
