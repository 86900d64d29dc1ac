//! `GET /sessions` and `DELETE /sessions/{id}`: a user's own devices.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::AppState;
use super::extract::{Authenticated, Caller};
use super::no_store;
use crate::domain::SessionId;
use crate::error::ApiError;
use crate::store::SessionInfo;

/// One session as the contract shows it: `ip` and `user_agent` are those of the last
/// use (login or refresh); the login's are given beside them.
#[derive(Serialize)]
pub struct SessionView {
    id: SessionId,
    created_at: DateTime<Utc>,
    last_used_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    ip: Option<String>,
    user_agent: Option<String>,
    current: bool,
    remember_me: bool,
    login_ip: Option<String>,
    login_user_agent: Option<String>,
}

/// The list response shared with the admin routes; `current` marks the caller's own.
pub fn session_list(sessions: Vec<SessionInfo>, current: SessionId) -> HttpResponse {
    let views: Vec<SessionView> = sessions
        .into_iter()
        .map(|s| SessionView {
            current: s.id == current,
            id: s.id,
            created_at: s.created_at,
            last_used_at: s.last_used_at,
            expires_at: s.expires_at,
            ip: s.last_ip,
            user_agent: s.last_user_agent,
            remember_me: s.remember_me,
            login_ip: s.login_ip,
            login_user_agent: s.login_user_agent,
        })
        .collect();
    no_store(HttpResponse::Ok()).json(views)
}

/// A path segment that must be a UUID; anything else is 404, as for an unknown id.
pub fn path_uuid(raw: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(raw).map_err(|_| ApiError::NotFound)
}

pub async fn list(
    state: web::Data<AppState>,
    Authenticated(claims): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let sessions = state.auth.sessions(&claims).await?;
    Ok(session_list(sessions, claims.sid))
}

pub async fn end(
    state: web::Data<AppState>,
    caller: Caller,
    Authenticated(claims): Authenticated,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = SessionId(path_uuid(&id)?);
    state
        .auth
        .end_own_session(&claims, id, &caller.info)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
