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

#[tokio::test]
async fn every_account_event_is_audited_without_an_address_or_a_token() {
    use tessera::config::EmailVerification;
    let server = crate::smtp::SmtpServer::start(Default::default()).await;
    let mut settings = crate::smtp::mailing(&server, EmailVerification::Optional);
    settings.registration.anonymous = true;
    let app = spawn_app_with(settings).await;
    let admin = app.admin().await;
    let wait = std::time::Duration::from_secs(10);
    // The token of the newest link of `action` sent to `to`.
    let link_to = |to: String, action: &'static str| {
        let server = &server;
        async move {
            let deadline = std::time::Instant::now() + wait;
            loop {
                let found = server.messages().into_iter().rev().find(|m| {
                    m.header("X-Test-Envelope-To").as_deref() == Some(to.as_str())
                        && m.text().contains(&format!("?action={action}&"))
                });
                if let Some(mail) = found {
                    return crate::smtp::link(&mail).1;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no {action} link to {to}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (email, new_email, invited, converted) = (
        format!("audit-{tag}@example.com"),
        format!("audit-new-{tag}@example.com"),
        format!("audit-invited-{tag}@example.com"),
        format!("audit-guest-{tag}@example.com"),
    );
    let mut tokens = Vec::new();

    // Verification sent and confirmed.
    app.register(&email, PASSWORD).await;
    let token = link_to(email.clone(), "verify_email").await;
    app.post_json("/email/verify", &json!({ "token": token }))
        .await;
    tokens.push(token);
    // Reset asked for and done.
    app.post_json("/password/forgot", &json!({ "email": email }))
        .await;
    let token = link_to(email.clone(), "reset_password").await;
    let res = app
        .post_json(
            "/password/reset",
            &json!({"token": token, "new_password": NEW_PASSWORD}),
        )
        .await;
    assert_eq!(
        res.status(),
        StatusCode::NO_CONTENT,
        "{}",
        res.text().await.unwrap()
    );
    tokens.push(token);
    // Email change asked for and confirmed.
    let session = app.login_ok_with(&email, NEW_PASSWORD).await;
    let res = app
        .client
        .put(app.url("/me/email"))
        .bearer_auth(&session.access)
        .json(&json!({"new_email": new_email, "password": NEW_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let token = link_to(new_email.clone(), "confirm_email_change").await;
    let res = app
        .post_json("/email/change/confirm", &json!({ "token": token }))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    tokens.push(token);
    // An invitation; an anonymous user created and converted; a deletion.
    let res = app
        .call(
            Method::POST,
            "/admin/users",
            &admin.access,
            Some(&json!({ "email": invited })),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let res = app
        .client
        .post(app.url("/users/anonymous"))
        .send()
        .await
        .unwrap();
    let guest = Tokens::from_body(res.json().await.unwrap());
    let res = app
        .client
        .post(app.url("/users"))
        .bearer_auth(&guest.access)
        .json(&json!({"email": converted, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let session = app.login_ok_with(&new_email, NEW_PASSWORD).await;
    let res = app
        .client
        .delete(app.url("/me"))
        .bearer_auth(&session.access)
        .json(&json!({ "password": NEW_PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);

    let kinds = app.audit_kinds().await;
    for kind in [
        "verification_sent",
        "email_verified",
        "password_reset_requested",
        "password_reset",
        "email_change_requested",
        "email_changed",
        "invitation_sent",
        "anonymous_created",
        "anonymous_converted",
        "user_deleted",
    ] {
        assert!(
            kinds.contains(&kind.to_owned()),
            "{kind} missing: {kinds:?}"
        );
    }
    let mut db = app.db().await;
    let rows: Vec<String> = sqlx::query_scalar(app.pick(
        "SELECT row_to_json(audit_events)::text FROM audit_events",
        "SELECT json_object('kind', kind, 'user_id', user_id, 'session_id', session_id,
                            'actor_id', actor_id, 'ip', ip, 'user_agent', user_agent,
                            'detail', detail)
         FROM audit_events",
    ))
    .fetch_all(&mut db)
    .await
    .unwrap();
    let text = rows.join("\n").to_lowercase();
    for secret in [&email, &new_email, &invited, &converted]
        .into_iter()
        .chain(&tokens)
        .chain([&guest.access, &guest.refresh])
    {
        assert!(
            !text.contains(&secret.to_lowercase()),
            "the audit trail holds {secret}: {text}"
        );
    }
}
