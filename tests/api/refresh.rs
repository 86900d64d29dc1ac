use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn refresh_rotates_the_token_and_keeps_the_session() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let first = app.login_ok(&email).await;
    let res = app.refresh(&first.refresh).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert_eq!(res.headers()["pragma"], "no-cache");
    let second = Tokens::from_body(res.json().await.unwrap());
    assert_ne!(second.refresh, first.refresh);
    assert_ne!(second.access, first.access);
    assert_eq!(second.session_id, first.session_id);
    assert_eq!(app.me(&second.access).await.status(), StatusCode::OK);
    let third = app.refresh_ok(&second.refresh).await;
    assert_eq!(third.session_id, first.session_id);
}

#[tokio::test]
async fn token_endpoint_refreshes_with_a_form_as_rfc6749_says() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    let res = app
        .post_form(
            "/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &tokens.refresh),
            ],
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["session_id"], tokens.session_id.as_str());
    assert_ne!(body["refresh_token"], tokens.refresh.as_str());
}

#[tokio::test]
async fn token_endpoint_rejects_other_grants_and_missing_fields() {
    let app = spawn_app().await;
    let res = app
        .post_form(
            "/token",
            &[
                ("grant_type", "password"),
                ("username", "a"),
                ("password", "b"),
            ],
        )
        .await;
    assert_error(res, StatusCode::BAD_REQUEST, "unsupported_grant_type").await;
    let res = app.post_form("/token", &[("refresh_token", "x")]).await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    let res = app
        .post_form("/token", &[("grant_type", "refresh_token")])
        .await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    let res = app
        .post_form(
            "/token",
            &[("grant_type", "refresh_token"), ("refresh_token", "nope")],
        )
        .await;
    assert_invalid_grant(res, "unknown").await;
}

#[tokio::test]
async fn unknown_refresh_tokens_are_invalid_grant_unknown() {
    let app = spawn_app().await;
    let well_formed = "A".repeat(43);
    for token in ["", "garbage", well_formed.as_str()] {
        assert_invalid_grant(app.refresh(token).await, "unknown").await;
    }
    let res = app.post_json("/refresh", &serde_json::json!({})).await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_refreshes_of_one_token_all_get_the_same_successor() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    let requests = (0..8).map(|_| app.refresh(&tokens.refresh));
    let successors = assert_one_successor(futures_util::future::join_all(requests).await).await;
    for t in &successors {
        assert_eq!(app.me(&t.access).await.status(), StatusCode::OK);
    }
    // Exactly one successor row exists, and the chain continues from it.
    let mut db = app.db().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM refresh_tokens")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(rows, 2);
    app.refresh_ok(&successors[0].refresh).await;
}

#[tokio::test]
async fn a_retry_within_the_grace_window_gets_the_same_successor() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    let first = app.refresh_ok(&tokens.refresh).await;
    let retry = app.refresh_ok(&tokens.refresh).await;
    assert_eq!(first.refresh, retry.refresh);
    assert_eq!(app.me(&retry.access).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn reuse_after_the_grace_window_revokes_the_session_and_its_access_tokens() {
    let mut settings = test_settings();
    settings.tokens.refresh_reuse_grace_secs = 1;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let login = app.login_ok(&email).await;
    let rotated = app.refresh_ok(&login.refresh).await;
    let newest = app.refresh_ok(&rotated.refresh).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;

    assert_invalid_grant(app.refresh(&login.refresh).await, "reused").await;
    // The whole chain is dead: the newest refresh token and every access token.
    assert_invalid_grant(app.refresh(&newest.refresh).await, "revoked").await;
    for access in [&login.access, &rotated.access, &newest.access] {
        assert_invalid_token(app.me(access).await).await;
    }
    // Other sessions of the same user are untouched.
    let other = app.login_ok(&email).await;
    assert_eq!(app.me(&other.access).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn with_the_grace_window_disabled_any_reuse_revokes() {
    let mut settings = test_settings();
    settings.tokens.refresh_reuse_grace_secs = 0;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let login = app.login_ok(&email).await;
    let next = app.refresh_ok(&login.refresh).await;
    assert_invalid_grant(app.refresh(&login.refresh).await, "reused").await;
    assert_invalid_token(app.me(&next.access).await).await;
}

#[tokio::test]
async fn sessions_end_after_their_absolute_lifetime() {
    let mut settings = test_settings();
    settings.tokens.refresh_short_absolute_ttl_secs = 1;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let login = app.login_ok(&email).await;
    assert_eq!(login.body["refresh_token_expires_in"].as_i64().unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_invalid_grant(app.refresh(&login.refresh).await, "expired").await;
}

#[tokio::test]
async fn sessions_end_when_idle_for_too_long() {
    let mut settings = test_settings();
    settings.tokens.refresh_idle_ttl_secs = 1;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let login = app.login_ok(&email).await;
    assert_eq!(login.body["refresh_token_expires_in"], 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_invalid_grant(app.refresh(&login.refresh).await, "idle_expired").await;
}

#[tokio::test]
async fn a_disabled_users_refresh_tokens_stop_working() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let login = app.login_ok(&email).await;
    let mut db = app.db().await;
    sqlx::query("UPDATE users SET disabled = true")
        .execute(&mut db)
        .await
        .unwrap();
    assert_invalid_grant(app.refresh(&login.refresh).await, "revoked").await;
}

#[tokio::test]
async fn amr_and_auth_time_come_from_the_login_and_survive_refreshes() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let login = app.login_ok(&email).await;
    let claims = login.claims();
    assert_eq!(claims["amr"], serde_json::json!(["pwd"]));
    let auth_time = claims["auth_time"].as_i64().unwrap();
    assert_eq!(auth_time, claims["iat"].as_i64().unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let next = app.refresh_ok(&login.refresh).await.claims();
    assert!(next["iat"].as_i64().unwrap() > auth_time, "a new token");
    assert_eq!(
        next["auth_time"].as_i64().unwrap(),
        auth_time,
        "the login's time"
    );
    assert_eq!(next["amr"], serde_json::json!(["pwd"]));
}

async fn refresh_as(app: &TestApp, refresh: &str, user_agent: &str) -> reqwest::Response {
    app.client
        .post(app.url("/refresh"))
        .header(reqwest::header::USER_AGENT, user_agent)
        .json(&serde_json::json!({ "refresh_token": refresh }))
        .send()
        .await
        .unwrap()
}

async fn login_as(app: &TestApp, email: &str, user_agent: &str) -> Tokens {
    let res = app
        .client
        .post(app.url("/login"))
        .header(reqwest::header::USER_AGENT, user_agent)
        .json(&serde_json::json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    Tokens::from_body(res.json().await.unwrap())
}

#[tokio::test]
async fn with_user_agent_binding_a_refresh_from_another_client_ends_the_session() {
    let mut settings = test_settings();
    settings.sessions.bind_user_agent = true;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let tokens = login_as(&app, &email, "phone-app/1.0").await;
    // The same client refreshes as usual.
    let res = refresh_as(&app, &tokens.refresh, "phone-app/1.0").await;
    assert_eq!(res.status(), StatusCode::OK);
    let tokens = Tokens::from_body(res.json().await.unwrap());
    // Another one ends the session, for everyone.
    assert_invalid_grant(
        refresh_as(&app, &tokens.refresh, "curl/8.5.0").await,
        "client_changed",
    )
    .await;
    assert_invalid_grant(
        refresh_as(&app, &tokens.refresh, "phone-app/1.0").await,
        "revoked",
    )
    .await;
    assert_invalid_token(app.me(&tokens.access).await).await;
    assert!(
        app.audit_kinds()
            .await
            .contains(&"session_client_changed".to_owned())
    );
}

#[tokio::test]
async fn without_user_agent_binding_a_new_user_agent_refreshes_as_usual() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let tokens = login_as(&app, &email, "phone-app/1.0").await;
    let res = refresh_as(&app, &tokens.refresh, "phone-app/2.0").await;
    assert_eq!(res.status(), StatusCode::OK);
}
