//! Anonymous users through HTTP: `POST /users/anonymous`, the conversion by `POST /users`
//! with the anonymous user's token (same id, the session goes on), what an anonymous
//! user cannot do, and the cleanup of those never converted.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{PASSWORD, TestApp, Tokens, assert_error, spawn_app_with, test_settings};

fn settings() -> tessera::config::Settings {
    let mut s = test_settings();
    s.registration.anonymous = true;
    s
}

async fn anonymous(app: &TestApp) -> Tokens {
    let res = app
        .client
        .post(app.url("/users/anonymous"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(
        res.headers().get("cache-control").unwrap(),
        "no-store",
        "a token response"
    );
    Tokens::from_body(res.json().await.unwrap())
}

async fn convert(app: &TestApp, token: &str, email: &str, password: &str) -> reqwest::Response {
    app.client
        .post(app.url("/users"))
        .bearer_auth(token)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

fn email() -> String {
    format!("anon-{}@example.com", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn an_anonymous_user_converts_keeping_its_id_and_its_session() {
    let app = spawn_app_with(settings()).await;
    let guest = anonymous(&app).await;
    let claims = guest.claims();
    assert_eq!(claims["roles"], json!(["anonymous"]));
    assert_eq!(claims["is_anonymous"], true);
    assert_eq!(claims["email_verified"], false);
    assert_eq!(claims["amr"], json!([]), "no authentication method");
    let me: Value = app.me(&guest.access).await.json().await.unwrap();
    assert_eq!(me["email"], Value::Null);
    assert_eq!(me["roles"], json!(["anonymous"]));
    let id = me["id"].as_str().unwrap().to_owned();

    // Refreshing works like any session's.
    let guest = app.refresh_ok(&guest.refresh).await;
    assert_eq!(guest.claims()["is_anonymous"], true);

    let address = email();
    let res = convert(&app, &guest.access, &address, PASSWORD).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["id"], id.as_str(), "the same user");
    assert_eq!(body["email"], address.as_str());

    // The session goes on; its next refresh carries the registered user's roles.
    let next = app.refresh_ok(&guest.refresh).await;
    let claims = next.claims();
    assert_eq!(claims["sub"], id.as_str());
    assert_eq!(claims["roles"], json!(["user"]));
    assert_eq!(claims["is_anonymous"], false);
    let me: Value = app.me(&next.access).await.json().await.unwrap();
    assert_eq!(me["email"], address.as_str());
    // And the user logs in with the email and password like any other.
    let login = app.login_ok(&address).await;
    assert_eq!(login.claims()["sub"], id.as_str());

    // A second conversion, with the old token or the new one, is refused.
    for token in [&guest.access, &next.access] {
        assert_error(
            convert(&app, token, &email(), PASSWORD).await,
            StatusCode::CONFLICT,
            "conflict",
        )
        .await;
    }
    let kinds = app.audit_kinds().await;
    for kind in ["anonymous_created", "anonymous_converted"] {
        assert!(kinds.contains(&kind.to_owned()), "{kind}: {kinds:?}");
    }
}

#[tokio::test]
async fn a_conversion_to_a_taken_email_or_with_a_bad_token_changes_nothing() {
    let app = spawn_app_with(settings()).await;
    let taken = app.new_user().await;
    let guest = anonymous(&app).await;
    assert_error(
        convert(&app, &guest.access, &taken, PASSWORD).await,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;
    assert_error(
        convert(&app, "not-a-token", &email(), PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;
    assert_error(
        convert(&app, &guest.access, "not an email", PASSWORD).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    let me: Value = app.me(&guest.access).await.json().await.unwrap();
    assert_eq!(me["email"], Value::Null, "still anonymous");
    // Still convertible.
    assert_eq!(
        convert(&app, &guest.access, &email(), PASSWORD)
            .await
            .status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn anonymous_users_need_the_setting_and_have_no_password_to_use() {
    let app = spawn_app_with(test_settings()).await;
    assert_error(
        app.client
            .post(app.url("/users/anonymous"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    let app = spawn_app_with(settings()).await;
    let guest = anonymous(&app).await;
    // Nothing that needs the password works: there is none.
    let res = app
        .client
        .put(app.url("/me/password"))
        .bearer_auth(&guest.access)
        .json(&json!({"current_password": "!no-password", "new_password": "whatever 123"}))
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    // Admins see it, with no email, and is_anonymous.
    let admin = app.admin().await;
    let id = guest.claims()["sub"].as_str().unwrap().to_owned();
    let res = app
        .call(
            reqwest::Method::GET,
            &format!("/admin/users/{id}"),
            &admin.access,
            None,
        )
        .await;
    let user: Value = res.json().await.unwrap();
    assert_eq!(user["email"], Value::Null);
    assert_eq!(user["is_anonymous"], true);
    // It has no address a reset link could go to.
    let res = app
        .call(
            reqwest::Method::POST,
            &format!("/admin/users/{id}/password-reset"),
            &admin.access,
            None,
        )
        .await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
}

#[tokio::test]
async fn anonymous_users_are_throttled_per_ip_like_registrations() {
    let mut s = settings();
    s.login.per_ip_per_minute = 3;
    let app = spawn_app_with(s).await;
    for _ in 0..3 {
        anonymous(&app).await;
    }
    let res = app
        .client
        .post(app.url("/users/anonymous"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(res.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn the_cleanup_deletes_idle_anonymous_users_and_keeps_used_and_converted_ones() {
    let mut s = settings();
    s.cleanup.anonymous_retention_secs = 2;
    s.cleanup.interval_secs = 3600;
    let app = spawn_app_with(s).await;
    let idle = anonymous(&app).await;
    let busy = anonymous(&app).await;
    let converted = anonymous(&app).await;
    let address = email();
    assert_eq!(
        convert(&app, &converted.access, &address, PASSWORD)
            .await
            .status(),
        StatusCode::CREATED
    );
    // Past the retention, with `busy` refreshed just before the pass.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let busy = app.refresh_ok(&busy.refresh).await;
    app.state.auth.cleanup().await.unwrap();

    // The idle one is gone: its refresh token is unknown, its access token revoked.
    let res = app.refresh(&idle.refresh).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        app.me(&idle.access).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.call(reqwest::Method::GET, "/sessions", &idle.access, None)
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.me(&busy.access).await.status(), StatusCode::OK);
    app.login_ok(&address).await;
    let kinds = app.audit_kinds().await;
    assert!(kinds.contains(&"user_deleted".to_owned()), "{kinds:?}");
}
