use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn health_endpoints_answer() {
    let app = spawn_app().await;
    let live = app.get("/health/live").await;
    assert_eq!(live.status(), StatusCode::OK);
    assert_eq!(live.headers()["x-content-type-options"], "nosniff");
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), StatusCode::OK);
    // The database's entry is named after it.
    let body: Value = ready.json().await.unwrap();
    let database = if app.sqlite() { "sqlite" } else { "postgres" };
    assert_eq!(body[database], "ok", "{body}");
    assert_eq!(body["status"], "ok", "{body}");
}

#[tokio::test]
async fn the_jwks_is_cacheable_and_publishes_only_public_keys() {
    let app = spawn_app().await;
    let res = app.get("/.well-known/jwks.json").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["cache-control"], "public, max-age=300");
    let body: Value = res.json().await.unwrap();
    let keys = body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    assert_eq!(key["alg"], "ES256");
    assert_eq!(key["use"], "sig");
    assert_eq!(key["kty"], "EC");
    assert!(key["kid"].as_str().is_some());
    assert!(key.get("d").is_none(), "no private part");
}

#[tokio::test]
async fn authorization_server_metadata_follows_rfc8414() {
    let mut settings = test_settings();
    settings.tokens.issuer = "https://auth.example.com".into();
    let app = spawn_app_with(settings).await;
    let body: Value = app
        .get("/.well-known/oauth-authorization-server")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["issuer"], "https://auth.example.com");
    assert_eq!(body["token_endpoint"], "https://auth.example.com/token");
    assert_eq!(
        body["revocation_endpoint"],
        "https://auth.example.com/revoke"
    );
    assert_eq!(
        body["introspection_endpoint"],
        "https://auth.example.com/introspect"
    );
    assert_eq!(
        body["jwks_uri"],
        "https://auth.example.com/.well-known/jwks.json"
    );
    assert_eq!(
        body["grant_types_supported"],
        serde_json::json!(["refresh_token"])
    );
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_contract_errors() {
    let app = spawn_app().await;
    let res = app.get("/no/such/thing").await;
    assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
    let res = app.get("/login").await;
    assert_error(res, StatusCode::METHOD_NOT_ALLOWED, "invalid_request").await;
    let res = app.client.put(app.url("/me")).send().await.unwrap();
    assert_error(res, StatusCode::METHOD_NOT_ALLOWED, "invalid_request").await;
}

#[tokio::test]
async fn cors_answers_only_configured_origins() {
    let mut settings = test_settings();
    settings.server.cors_allowed_origins = vec!["https://app.example.com".into()];
    let app = spawn_app_with(settings).await;
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/login"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let res = preflight("https://app.example.com").await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(
        res.headers()["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    // Credentialed: browser sessions send the refresh cookie (tests/api/cookies.rs).
    assert_eq!(res.headers()["access-control-allow-credentials"], "true");
    let res = preflight("https://evil.example.com").await.unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;

    let email = app.new_user().await;
    let res = app
        .client
        .post(app.url("/login"))
        .header("origin", "https://app.example.com")
        .json(&serde_json::json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
}

#[tokio::test]
async fn without_configured_origins_no_cors_headers_are_sent() {
    let app = spawn_app().await;
    let res = app
        .client
        .get(app.url("/health/live"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

/// The route patterns `src/startup.rs` registers (each `resource("/…"` call).
fn registered_routes() -> Vec<String> {
    let source = include_str!("../../src/startup.rs");
    let routes = &source[source.find("fn routes(").unwrap()..];
    routes
        .split("resource(")
        .skip(1)
        .filter_map(|call| {
            let start = call.find('"')? + 1;
            let end = start + call[start..].find('"')?;
            Some(call[start..end].to_owned())
        })
        .filter(|p| p.starts_with('/'))
        .collect()
}

#[tokio::test]
async fn the_openapi_document_is_served_and_agrees_with_the_routes_both_ways() {
    let app = spawn_app().await;
    let res = app.get("/openapi.json").await;
    assert_eq!(res.status(), StatusCode::OK);
    let served: Value = res.json().await.unwrap();
    let file: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    assert_eq!(served, file);
    let paths = served["paths"].as_object().unwrap();

    // Every registered route is documented, and every documented path is routed.
    let mut routes = registered_routes();
    routes.sort();
    let mut documented: Vec<String> = paths.keys().cloned().collect();
    documented.sort();
    assert_eq!(routes, documented);

    // Each documented method is served (never 405); any other gets 405 with an Allow
    // header naming exactly the documented ones (RFC 9110).
    let all = ["GET", "POST", "PUT", "PATCH", "DELETE"];
    for (path, operations) in paths {
        let url = app.url(&path.replace("{id}", &uuid::Uuid::new_v4().to_string()));
        let methods: Vec<String> = operations
            .as_object()
            .unwrap()
            .keys()
            .map(|m| m.to_ascii_uppercase())
            .filter(|m| all.contains(&m.as_str()))
            .collect();
        for method in &methods {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let res = app
                .client
                .request(method.clone(), &url)
                .send()
                .await
                .unwrap();
            assert_ne!(
                res.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
        }
        let other = all
            .iter()
            .find(|m| !methods.iter().any(|d| d == *m))
            .unwrap();
        let method = reqwest::Method::from_bytes(other.as_bytes()).unwrap();
        let res = app.client.request(method, &url).send().await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{other} {path}"
        );
        let mut allowed: Vec<String> = res.headers()["allow"]
            .to_str()
            .unwrap()
            .split(", ")
            .map(str::to_owned)
            .collect();
        allowed.sort();
        let mut expected = methods.clone();
        expected.sort();
        assert_eq!(allowed, expected, "Allow of {path}");
        assert_error(res, StatusCode::METHOD_NOT_ALLOWED, "invalid_request").await;
    }
}

/// A clone of the repository has everything its docs point at: no link or path leads
/// outside it (`../`), and the relative links that stay inside it resolve.
#[test]
fn the_readme_and_docs_point_at_nothing_outside_the_repository() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("../"),
            "{} points outside the repository",
            file.display()
        );
        for link in text.split("](").skip(1) {
            let target = link.split([')', '#']).next().unwrap();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let base = file.parent().unwrap();
            assert!(
                base.join(target).exists(),
                "{}: broken link {target}",
                file.display()
            );
        }
    }
}
