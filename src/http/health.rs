//! `GET /health/live` (the process answers) and `GET /health/ready` (Postgres and Redis
//! answer too).

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::error::ApiError;
use crate::startup::AppState;

pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let (db, redis) = tokio::join!(state.auth.store.ping(), state.auth.denylist.ping());
    db?;
    redis.map_err(ApiError::unavailable)?;
    Ok(HttpResponse::Ok().json(json!({"status": "ok", "postgres": "ok", "redis": "ok"})))
}
