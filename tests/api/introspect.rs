use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

async fn app_with_client() -> TestApp {
    let mut settings = test_settings();
    // One plain secret, one stored as its SHA-256 ("s3cret").
    settings.introspection.clients = vec![
        "api:api-secret".to_owned().into(),
        "hashed:sha256:1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
            .to_owned()
            .into(),
    ];
    spawn_app_with(settings).await
}

async fn introspect(app: &TestApp, token: &str, id: &str, secret: &str) -> reqwest::Response {
    introspect_from(app, None, id, secret, token).await
}

#[tokio::test]
async fn an_active_token_introspects_with_its_claims() {
    let app = app_with_client().await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let res = introspect(&app, &t.access, "api", "api-secret").await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["active"], true);
    assert_eq!(body["sid"], t.session_id.as_str());
    assert_eq!(body["aud"], "tessera");
    assert_eq!(body["roles"], json!(["user"]));
    assert_eq!(body["email_verified"], false);
    assert_eq!(body["is_anonymous"], false);
    assert_eq!(body["amr"], json!(["pwd"]));
    assert!(body["auth_time"].as_i64().unwrap() > 0);
    for field in ["sub", "jti", "exp", "iat", "iss", "token_type"] {
        assert!(body.get(field).is_some(), "missing {field}");
    }
    let hashed = introspect(&app, &t.access, "hashed", "s3cret").await;
    assert_eq!(hashed.json::<Value>().await.unwrap()["active"], true);
}

#[tokio::test]
async fn revoked_expired_or_garbage_tokens_are_exactly_inactive() {
    let app = app_with_client().await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    app.logout(&t.access, None).await;
    for token in [t.access.as_str(), "garbage", t.refresh.as_str()] {
        let res = introspect(&app, token, "api", "api-secret").await;
        assert_eq!(res.status(), StatusCode::OK);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body, json!({"active": false}));
    }
}

#[tokio::test]
async fn an_expired_token_introspects_as_exactly_inactive() {
    let mut settings = test_settings();
    settings.introspection.clients = vec!["api:api-secret".to_owned().into()];
    settings.tokens.access_ttl_secs = 1;
    settings.tokens.leeway_secs = 0;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let res = introspect(&app, &t.access, "api", "api-secret").await;
    assert_eq!(res.json::<Value>().await.unwrap()["active"], true);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let res = introspect(&app, &t.access, "api", "api-secret").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"active": false}));
}

#[tokio::test]
async fn introspection_needs_valid_client_credentials() {
    let app = app_with_client().await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let anonymous = app.post_form("/introspect", &[("token", &t.access)]).await;
    assert_eq!(
        anonymous.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .split(' ')
            .next(),
        Some("Basic")
    );
    assert_error(anonymous, StatusCode::UNAUTHORIZED, "invalid_client").await;
    for (id, secret) in [
        ("api", "wrong"),
        ("nobody", "api-secret"),
        ("hashed", "wrong"),
    ] {
        let res = introspect(&app, &t.access, id, secret).await;
        assert_error(res, StatusCode::UNAUTHORIZED, "invalid_client").await;
    }
    let bearer = app
        .client
        .post(app.url("/introspect"))
        .bearer_auth(&t.access)
        .form(&[("token", &t.access)])
        .send()
        .await
        .unwrap();
    assert_error(bearer, StatusCode::UNAUTHORIZED, "invalid_client").await;
}

/// `/introspect` as client `id`, through a trusted proxy for client `ip` if given.
async fn introspect_from(
    app: &TestApp,
    ip: Option<&str>,
    id: &str,
    secret: &str,
    token: &str,
) -> reqwest::Response {
    let mut req = app.client.post(app.url("/introspect"));
    if let Some(ip) = ip {
        req = req.header("x-forwarded-for", ip);
    }
    req.basic_auth(id, Some(secret))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn failed_client_authentication_is_throttled_per_client_id_and_per_ip() {
    let mut settings = test_settings();
    settings.introspection.clients = vec![
        "api:api-secret".to_owned().into(),
        "b:b-secret".to_owned().into(),
    ];
    settings.introspection.failures_per_minute = 3;
    settings.server.trusted_proxies = vec!["127.0.0.1".into()];
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;

    // Successes never count.
    for _ in 0..12 {
        let res = introspect_from(&app, Some("192.0.2.1"), "api", "api-secret", &t.access).await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    // Guessing the secret of "api" from one address ...
    for _ in 0..3 {
        let res = introspect_from(&app, Some("192.0.2.2"), "api", "guess", &t.access).await;
        assert_error(res, StatusCode::UNAUTHORIZED, "invalid_client").await;
    }
    // ... blocks that client id from everywhere, even with the right secret, so a
    // right guess cannot show through.
    let res = introspect_from(&app, Some("192.0.2.3"), "api", "api-secret", &t.access).await;
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // ... and that address for every client id.
    let res = introspect_from(&app, Some("192.0.2.2"), "b", "b-secret", &t.access).await;
    assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // Others are not affected.
    let res = introspect_from(&app, Some("192.0.2.3"), "b", "b-secret", &t.access).await;
    assert_eq!(res.status(), StatusCode::OK);

    // Spraying many client ids from one address is limited per address.
    for i in 0..3 {
        let res = introspect_from(&app, Some("192.0.2.4"), &format!("id{i}"), "x", &t.access).await;
        assert_error(res, StatusCode::UNAUTHORIZED, "invalid_client").await;
    }
    let res = introspect_from(&app, Some("192.0.2.4"), "b", "b-secret", &t.access).await;
    assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
}
