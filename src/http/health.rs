//! `GET /health/live` (the process answers) and `GET /health/ready` (the database and
//! Redis answer too, and Redis will not evict revocation marks). The database's entry is
//! named after it: `"postgres"` or `"sqlite"`.

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;
use crate::error::ApiError;
use crate::store::MarksHealth;

pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        // Shutting down: requests are still served, but send no new ones here.
        return Ok(HttpResponse::ServiceUnavailable()
            .insert_header((actix_web::http::header::RETRY_AFTER, "30"))
            .json(json!({
                "error": "temporarily_unavailable",
                "error_description": "this instance is shutting down",
                "status": "draining",
            })));
    }
    let (db, marks) = tokio::join!(state.auth.store.ping(), state.auth.revocations.health());
    db?;
    let database = state.auth.store.name();
    if let MarksHealth::Unsafe(why) = marks.map_err(ApiError::unavailable)? {
        // Not ready: under memory pressure Redis would drop revocation marks.
        // The contract's error shape, with the readiness details beside it.
        return Ok(HttpResponse::ServiceUnavailable()
            .insert_header((actix_web::http::header::RETRY_AFTER, "30"))
            .json(json!({
                "error": "temporarily_unavailable",
                "error_description": why,
                "status": "unavailable",
                database: "ok",
                "redis": why,
            })));
    }
    let redis = match state.auth.revocations.in_process() {
        true => "not used: single-instance mode, revocations in process",
        false => "ok",
    };
    Ok(HttpResponse::Ok().json(json!({"status": "ok", database: "ok", "redis": redis})))
}
