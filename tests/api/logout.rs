use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn local_logout_ends_this_session_at_once() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let here = app.login_ok(&email).await;
    let elsewhere = app.login_ok(&email).await;
    let res = app.logout(&here.access, None).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_invalid_token(app.me(&here.access).await).await;
    assert_invalid_grant(app.refresh(&here.refresh).await, "revoked").await;
    assert_eq!(app.me(&elsewhere.access).await.status(), StatusCode::OK);
    app.refresh_ok(&elsewhere.refresh).await;
}

#[tokio::test]
async fn logout_others_keeps_only_the_callers_session() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let here = app.login_ok(&email).await;
    let a = app.login_ok(&email).await;
    let b = app.login_ok(&email).await;
    assert_eq!(
        app.logout(&here.access, Some("others")).await.status(),
        StatusCode::NO_CONTENT
    );
    for other in [&a, &b] {
        assert_invalid_token(app.me(&other.access).await).await;
        assert_invalid_grant(app.refresh(&other.refresh).await, "revoked").await;
    }
    assert_eq!(app.me(&here.access).await.status(), StatusCode::OK);
    app.refresh_ok(&here.refresh).await;
}

#[tokio::test]
async fn global_logout_ends_every_session_of_the_user_only() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let someone_else = app.new_user().await;
    let here = app.login_ok(&email).await;
    let there = app.login_ok(&email).await;
    let unrelated = app.login_ok(&someone_else).await;
    assert_eq!(
        app.logout(&here.access, Some("global")).await.status(),
        StatusCode::NO_CONTENT
    );
    for t in [&here, &there] {
        assert_invalid_token(app.me(&t.access).await).await;
        assert_invalid_grant(app.refresh(&t.refresh).await, "revoked").await;
    }
    assert_eq!(app.me(&unrelated.access).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn logout_needs_a_valid_token_and_a_known_scope() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    assert_invalid_token(app.client.post(app.url("/logout")).send().await.unwrap()).await;
    let res = app
        .client
        .post(app.url("/logout"))
        .bearer_auth(&t.access)
        .json(&json!({"scope": "everything"}))
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert_eq!(
        app.me(&t.access).await.status(),
        StatusCode::OK,
        "a refused logout changes nothing"
    );
    assert_eq!(
        app.logout(&t.access, Some("local")).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_invalid_token(app.logout(&t.access, None).await).await;
}

#[tokio::test]
async fn denylist_marks_expire_when_the_tokens_they_cover_would() {
    crate::shared_backend_only!();
    let app = spawn_app().await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    app.logout(&t.access, None).await;
    let mut redis = app.redis().await;
    let key = format!(
        "{}revoked:sid:{}",
        app.settings.redis.key_prefix, t.session_id
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    let horizon =
        (app.settings.tokens.access_ttl_secs + app.settings.tokens.leeway_secs + 1) as i64;
    assert!(
        ttl > horizon - 10 && ttl <= horizon,
        "ttl {ttl}, horizon {horizon}"
    );
}
