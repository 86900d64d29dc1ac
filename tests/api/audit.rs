use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

const NEW_PASSWORD: &str = "another long passphrase";

#[tokio::test]
async fn every_auth_event_is_audited_without_secrets() {
    let mut settings = test_settings();
    settings.tokens.refresh_reuse_grace_secs = 0;
    settings.login.free_failures = 1;
    settings.login.delay_base_secs = 60;
    settings.login.delay_max_secs = 60;
    let app = spawn_app_with(settings).await;
    let admin = app.admin().await;
    let email = app.new_user().await;
    let user_id = app.user_id(&email).await;
    let first_audited = app.audit_kinds().await.len();

    assert_eq!(
        app.login(&email, "wrong password").await.status(),
        StatusCode::UNAUTHORIZED
    );
    // One failure is free; the next attempt must wait.
    assert_eq!(
        app.login(&email, "wrong password").await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    app.forget_login_failures(&email).await;
    let first = app.login_ok(&email).await;
    let second = app.refresh_ok(&first.refresh).await;
    app.refresh(&first.refresh).await; // reuse
    let other = app.login_ok(&email).await;
    app.post_form("/revoke", &[("token", &other.access)]).await;
    let last = app.login_ok(&email).await;
    let ended = app.login_ok(&email).await;
    let path = format!("/sessions/{}", ended.session_id);
    app.call(Method::DELETE, &path, &last.access, None).await;
    let res = app
        .change_password(&last.access, "not it", NEW_PASSWORD)
        .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    app.forget_login_failures(&email).await;
    let res = app
        .change_password(&last.access, PASSWORD, NEW_PASSWORD)
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let patch = json!({"roles": ["user", "auditor"]});
    let res = app
        .call(
            Method::PATCH,
            &format!("/admin/users/{user_id}"),
            &admin.access,
            Some(&patch),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = app
        .call(
            Method::DELETE,
            &format!("/admin/users/{user_id}/sessions"),
            &admin.access,
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let again = app.login_ok_with(&email, NEW_PASSWORD).await;
    assert_eq!(
        app.logout(&again.access, None).await.status(),
        StatusCode::NO_CONTENT
    );

    let mut db = app.db().await;
    let rows: Vec<(String, Option<String>, Option<String>, String)> = sqlx::query_as(app.pick(
        "SELECT kind, CAST(user_id AS TEXT), ip, row_to_json(audit_events)::text
         FROM audit_events
         WHERE id > (SELECT min(id) FROM audit_events) + $1 - 1 ORDER BY id",
        "SELECT kind, user_id, ip,
                json_object('id', id, 'occurred_at', occurred_at, 'kind', kind,
                            'user_id', user_id, 'session_id', session_id,
                            'actor_id', actor_id, 'ip', ip, 'user_agent', user_agent,
                            'detail', detail)
         FROM audit_events
         WHERE id > (SELECT min(id) FROM audit_events) + $1 - 1 ORDER BY id",
    ))
    .bind(first_audited as i64)
    .fetch_all(&mut db)
    .await
    .unwrap();
    let kinds: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "login_failed",
            "login_throttled",
            "login_succeeded",
            "refresh",
            "refresh_reuse_detected",
            "login_succeeded",
            "revoke",
            "login_succeeded",
            "login_succeeded",
            "session_ended",
            "password_change_failed",
            "password_changed",
            "admin_user_updated",
            "admin_sessions_ended",
            "login_succeeded",
            "logout",
        ]
    );
    assert!(
        rows.iter()
            .all(|r| r.1 == Some(user_id.to_string()) && r.2.as_deref() == Some("127.0.0.1")),
        "every row names the user and the client IP: {rows:?}"
    );
    let hashes: Vec<String> = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_all(&mut db)
        .await
        .unwrap();
    let mut secrets = vec![
        PASSWORD,
        NEW_PASSWORD,
        "wrong password",
        "not it",
        &first.refresh,
        &second.refresh,
        &other.access,
        &last.access,
        &again.refresh,
    ];
    secrets.extend(hashes.iter().map(String::as_str));
    for (_, _, _, json) in &rows {
        for secret in &secrets {
            assert!(!json.contains(secret), "audit row leaks a secret: {json}");
        }
        assert!(!json.contains(&email), "no email in audit rows: {json}");
    }
}
