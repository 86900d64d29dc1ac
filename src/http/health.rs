//! `GET /health/live` (the process answers) and `GET /health/ready` (Postgres and Redis
//! answer too, and Redis will not evict revocation marks).

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::error::ApiError;
use crate::startup::AppState;

pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let (db, policy) = tokio::join!(
        state.auth.store.ping(),
        state.auth.denylist.eviction_policy()
    );
    db?;
    let policy = policy.map_err(ApiError::unavailable)?;
    if let Some(policy) = policy.filter(|p| p != "noeviction") {
        // Not ready: under memory pressure Redis would drop revocation marks.
        // The contract's error shape, with the readiness details beside it.
        let why = format!(
            "maxmemory-policy is {policy}: Redis may evict revocation marks; set noeviction"
        );
        return Ok(HttpResponse::ServiceUnavailable()
            .insert_header((actix_web::http::header::RETRY_AFTER, "30"))
            .json(json!({
                "error": "temporarily_unavailable",
                "error_description": why,
                "status": "unavailable",
                "postgres": "ok",
                "redis": why,
            })));
    }
    Ok(HttpResponse::Ok().json(json!({"status": "ok", "postgres": "ok", "redis": "ok"})))
}
