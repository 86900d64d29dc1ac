use std::time::Duration;

use crate::helpers::*;

async fn count(app: &TestApp, table: &str) -> i64 {
    let mut db = app.db().await;
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&mut db)
        .await
        .unwrap()
}

/// Ended sessions are kept one second (the least the 1 s access tokens allow).
fn short_retention() -> tessera::config::Settings {
    let mut settings = test_settings();
    settings.tokens.access_ttl_secs = 1;
    settings.tokens.leeway_secs = 0;
    settings.cleanup.session_retention_secs = 1;
    settings
}

#[tokio::test]
async fn cleanup_deletes_sessions_ended_past_retention_in_batches_and_keeps_live_ones() {
    let mut settings = short_retention();
    settings.cleanup.batch_size = 2;
    settings.cleanup.audit_retention_secs = 0;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let live = app.login_ok(&email).await;
    let live = app.refresh_ok(&live.refresh).await;
    let mut ended = Vec::new();
    for _ in 0..5 {
        let t = app.login_ok(&email).await;
        app.refresh_ok(&t.refresh).await;
        app.logout(&t.access, None).await;
        ended.push(t);
    }
    assert_eq!(count(&app, "sessions").await, 6);
    assert_eq!(count(&app, "refresh_tokens").await, 12);

    // Within retention, nothing goes, and a late refresh still says why it failed.
    let cleaned = app.state.auth.cleanup().await.unwrap();
    assert_eq!(cleaned.sessions, 0);
    assert_invalid_grant(app.refresh(&ended[0].refresh).await, "revoked").await;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cleaned = app.state.auth.cleanup().await.unwrap();
    assert_eq!(cleaned.sessions, 5, "in batches of 2 until done");
    assert_eq!(count(&app, "sessions").await, 1);
    assert_eq!(
        count(&app, "refresh_tokens").await,
        2,
        "the live chain stays"
    );
    app.refresh_ok(&live.refresh).await;
    assert_invalid_grant(app.refresh(&ended[0].refresh).await, "unknown").await;
    assert!(
        count(&app, "audit_events").await > 0,
        "audit kept (retention 0)"
    );
}

#[tokio::test]
async fn cleanup_deletes_expired_and_idle_sessions_and_old_audit_rows() {
    let mut settings = test_settings();
    settings.tokens.access_ttl_secs = 1;
    settings.tokens.leeway_secs = 0;
    settings.tokens.refresh_idle_ttl_secs = 1;
    settings.cleanup.session_retention_secs = 1;
    settings.cleanup.audit_retention_secs = 1;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let aged = app.login_ok(&email).await;
    let mut db = app.db().await;
    // Age one session past its absolute end; the other just idles out.
    sqlx::query(app.pick(
        "UPDATE sessions SET expires_at = now() - interval '1 hour' WHERE id = $1::uuid",
        "UPDATE sessions SET expires_at = expires_at - 3600000000 WHERE id = $1",
    ))
    .bind(&aged.session_id)
    .execute(&mut db)
    .await
    .unwrap();
    app.login_ok(&email).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let fresh = app.login_ok(&email).await;

    let cleaned = app.state.auth.cleanup().await.unwrap();
    assert_eq!(cleaned.sessions, 2);
    assert!(cleaned.audit_events >= 3, "{cleaned:?}");
    let left: Vec<String> = sqlx::query_scalar("SELECT CAST(id AS TEXT) FROM sessions")
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert_eq!(left, [fresh.session_id]);
    // Only the rows written within the retention remain.
    assert_eq!(app.audit_kinds().await, ["login_succeeded"]);
}

#[tokio::test]
async fn the_cleanup_runs_periodically_on_its_own() {
    let mut settings = short_retention();
    settings.cleanup.interval_secs = 1;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    app.logout(&t.access, None).await;
    eventually("the ended session is deleted", || async {
        count(&app, "sessions").await == 0
    })
    .await;
}

#[tokio::test]
async fn emailed_tokens_go_once_expired_past_retention_and_say_why_until_then() {
    use tessera::config::EmailVerification;
    let server = crate::smtp::SmtpServer::start(Default::default()).await;
    let mut settings = crate::smtp::mailing(&server, EmailVerification::Optional);
    settings.tokens.access_ttl_secs = 1;
    settings.tokens.leeway_secs = 0;
    settings.cleanup.session_retention_secs = 1;
    settings.email.verify_ttl_secs = 1;
    let app = spawn_app_with(settings).await;
    let used = app.new_user().await;
    let unused = app.new_user().await;
    let mails = server.wait_for(2, Duration::from_secs(10)).await;
    let token_of = |to: &str| {
        let mail = mails
            .iter()
            .find(|m| m.header("X-Test-Envelope-To").as_deref() == Some(to))
            .unwrap();
        crate::smtp::link(mail).1
    };
    let (used_token, unused_token) = (token_of(&used), token_of(&unused));
    let verify = |token: String| {
        let app = &app;
        async move {
            app.post_json("/email/verify", &serde_json::json!({ "token": token }))
                .await
        }
    };
    assert_eq!(
        verify(used_token.clone()).await.status(),
        reqwest::StatusCode::OK
    );
    assert_eq!(count(&app, "email_tokens").await, 2);

    // Expired, within retention: kept, and a late use says why.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.state.auth.cleanup().await.unwrap().email_tokens, 0);
    assert_invalid_grant(verify(used_token.clone()).await, "used").await;
    assert_invalid_grant(verify(unused_token.clone()).await, "expired").await;

    // Past it: both go, used or not.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.state.auth.cleanup().await.unwrap().email_tokens, 2);
    assert_eq!(count(&app, "email_tokens").await, 0);
    assert_invalid_grant(verify(used_token).await, "unknown").await;
}
