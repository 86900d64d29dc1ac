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
