use reqwest::StatusCode;

use crate::helpers::*;

#[tokio::test]
async fn revoking_a_refresh_token_ends_its_session() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let res = app
        .post_form(
            "/revoke",
            &[("token", &t.refresh), ("token_type_hint", "refresh_token")],
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_invalid_grant(app.refresh(&t.refresh).await, "revoked").await;
    assert_invalid_token(app.me(&t.access).await).await;
}

#[tokio::test]
async fn revoking_an_access_token_revokes_that_token_only() {
    crate::shared_backend_only!();
    let app = spawn_app().await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let next = app.refresh_ok(&t.refresh).await;
    let res = app
        .post_form(
            "/revoke",
            &[("token", &t.access), ("token_type_hint", "access_token")],
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_invalid_token(app.me(&t.access).await).await;
    assert_eq!(app.me(&next.access).await.status(), StatusCode::OK);
    let mut redis = app.redis().await;
    let pattern = format!("{}revoked:jti:*", app.settings.redis.key_prefix);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1);
    let ttl: i64 = redis::cmd("TTL")
        .arg(&keys[0])
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 931, "{ttl}");
}

#[tokio::test]
async fn revoking_unknown_or_malformed_tokens_is_still_200() {
    let app = spawn_app().await;
    let well_formed = "B".repeat(43);
    for token in ["garbage", well_formed.as_str(), "a.b.c"] {
        let res = app.post_form("/revoke", &[("token", token)]).await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    // JSON is accepted as well.
    let res = app
        .post_json("/revoke", &serde_json::json!({"token": "garbage"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn revoke_without_a_token_is_invalid_request() {
    let app = spawn_app().await;
    let res = app
        .post_form("/revoke", &[("token_type_hint", "access_token")])
        .await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
}

async fn pttl(app: &TestApp, key: &str) -> i64 {
    let mut redis = app.redis().await;
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut redis)
        .await
        .unwrap()
}

async fn revoke_rows(app: &TestApp) -> usize {
    app.audit_kinds()
        .await
        .iter()
        .filter(|k| *k == "revoke")
        .count()
}

async fn revoke(app: &TestApp, token: &str) {
    let res = app.post_form("/revoke", &[("token", token)]).await;
    assert_eq!(res.status(), StatusCode::OK);
}

async fn revoked_at(db: &mut sqlx::AnyConnection) -> String {
    sqlx::query_scalar("SELECT CAST(revoked_at AS TEXT) FROM sessions WHERE revoked_at IS NOT NULL")
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_repeated_revocation_writes_no_row_no_mark_and_no_audit_event() {
    crate::shared_backend_only!();
    let app = spawn_app().await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let prefix = &app.settings.redis.key_prefix;
    let sid_key = format!("{prefix}revoked:sid:{}", t.session_id);

    revoke(&app, &t.refresh).await;
    let first = pttl(&app, &sid_key).await;
    assert!(first > 0);
    let mut db = app.db().await;
    let ended = revoked_at(&mut db).await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    for _ in 0..3 {
        revoke(&app, &t.refresh).await;
    }
    assert!(
        pttl(&app, &sid_key).await <= first - 1000,
        "the mark was written again"
    );
    assert_eq!(revoked_at(&mut db).await, ended);
    assert_eq!(revoke_rows(&app).await, 1);

    // The same for an access token: one mark, one event.
    let other = app.login_ok(&email).await;
    revoke(&app, &other.access).await;
    let claims: serde_json::Value = {
        use base64::Engine;
        let payload = other.access.split('.').nth(1).unwrap();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        serde_json::from_slice(&raw).unwrap()
    };
    let jti_key = format!("{prefix}revoked:jti:{}", claims["jti"].as_str().unwrap());
    let first = pttl(&app, &jti_key).await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    revoke(&app, &other.access).await;
    assert!(pttl(&app, &jti_key).await <= first - 1000);
    assert_eq!(revoke_rows(&app).await, 2);
    assert_invalid_token(app.me(&other.access).await).await;
}

#[tokio::test]
async fn a_repeated_revocation_still_repairs_a_missing_mark() {
    crate::shared_backend_only!();
    // The mark is deleted from Redis behind the server's back to stand for a write that
    // failed; an in-memory copy that saw the write would rightly keep refusing.
    let mut settings = test_settings();
    settings.redis.local_copy = false;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    app.post_form("/revoke", &[("token", &t.refresh)]).await;
    // As if the first revocation's Redis write had failed.
    let mut redis = app.redis().await;
    let key = format!(
        "{}revoked:sid:{}",
        app.settings.redis.key_prefix, t.session_id
    );
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(app.me(&t.access).await.status(), StatusCode::OK);
    let res = app.post_form("/revoke", &[("token", &t.refresh)]).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_invalid_token(app.me(&t.access).await).await;
}
