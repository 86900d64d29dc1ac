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
    app.client
        .post(app.url("/introspect"))
        .basic_auth(id, Some(secret))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
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
