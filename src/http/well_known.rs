//! `GET /.well-known/jwks.json` and the RFC 8414 metadata document.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;

pub async fn jwks(state: web::Data<AppState>) -> HttpResponse {
    let ring = state.auth.tokens.keyring().current();
    let max_age = state.auth.settings().keys.jwks_max_age_secs;
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, format!("public, max-age={max_age}")))
        .content_type("application/json")
        .body(ring.jwks.clone())
}

pub async fn metadata(state: web::Data<AppState>) -> HttpResponse {
    let settings = state.auth.settings();
    let issuer = settings.tokens.issuer.trim_end_matches('/');
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .json(json!({
            "issuer": settings.tokens.issuer,
            "token_endpoint": format!("{issuer}/token"),
            "revocation_endpoint": format!("{issuer}/revoke"),
            "introspection_endpoint": format!("{issuer}/introspect"),
            "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
            "grant_types_supported": ["refresh_token"],
            "response_types_supported": [],
            "token_endpoint_auth_methods_supported": ["none"],
            "revocation_endpoint_auth_methods_supported": ["none"],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
        }))
}
