use reqwest::StatusCode;

use crate::helpers::*;

#[tokio::test]
async fn auth_events_are_audited_without_secrets() {
    let mut settings = test_settings();
    settings.tokens.refresh_reuse_grace_secs = 0;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    assert_eq!(
        app.login(&email, "wrong password").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let first = app.login_ok(&email).await;
    let second = app.refresh_ok(&first.refresh).await;
    app.refresh(&first.refresh).await; // reuse
    let other = app.login_ok(&email).await;
    app.post_form("/revoke", &[("token", &other.access)]).await;
    let last = app.login_ok(&email).await;
    assert_eq!(
        app.logout(&last.access, None).await.status(),
        StatusCode::NO_CONTENT
    );

    let mut db = app.db().await;
    let rows: Vec<(String, Option<uuid::Uuid>, Option<String>, String)> = sqlx::query_as(
        "SELECT kind, user_id, ip, row_to_json(audit_events)::text FROM audit_events ORDER BY id",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let kinds: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "user_created",
            "login_failed",
            "login_succeeded",
            "refresh_reuse_detected",
            "login_succeeded",
            "revoke",
            "login_succeeded",
            "logout"
        ]
    );
    assert!(
        rows.iter()
            .all(|r| r.1.is_some() && r.2.as_deref() == Some("127.0.0.1"))
    );
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(&mut db)
        .await
        .unwrap();
    for (_, _, _, json) in &rows {
        for secret in [
            PASSWORD,
            "wrong password",
            hash.as_str(),
            &first.refresh,
            &second.refresh,
            &other.access,
            &last.access,
        ] {
            assert!(!json.contains(secret), "audit row leaks a secret: {json}");
        }
    }
}
