//! `GET /openapi.json`: the OpenAPI document of `docs/openapi.json`, compiled in, and
//! the `Allow` header of 405 answers, taken from it (RFC 9110 requires one). A test
//! checks the document against the routes both ways, so neither can drift.

use std::collections::HashMap;
use std::sync::LazyLock;

use actix_web::HttpResponse;
use actix_web::http::header;

pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

/// The documented methods of each path template, as an `Allow` value ("GET, DELETE").
static ALLOW: LazyLock<HashMap<String, String>> = LazyLock::new(|| {
    let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("docs/openapi.json is JSON");
    doc["paths"]
        .as_object()
        .expect("docs/openapi.json has paths")
        .iter()
        .map(|(path, operations)| {
            let methods: Vec<String> = operations
                .as_object()
                .into_iter()
                .flat_map(|ops| ops.keys())
                .filter(|m| ["get", "put", "post", "delete", "patch"].contains(&m.as_str()))
                .map(|m| m.to_ascii_uppercase())
                .collect();
            (path.clone(), methods.join(", "))
        })
        .collect()
});

/// The `Allow` value for a route pattern (actix's `{id}` is OpenAPI's too).
pub fn allowed(pattern: &str) -> Option<&'static str> {
    ALLOW.get(pattern).map(String::as_str)
}

pub async fn document() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
        .content_type("application/json")
        .body(DOCUMENT)
}
