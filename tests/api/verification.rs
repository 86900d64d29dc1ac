//! Email verification through HTTP, with a real SMTP server (see `smtp.rs`): the link a
//! registration or `POST /email/verification` sends, `POST /email/verify`, the reasons a
//! link is refused, no enumeration, throttles; and the outbox under it: a mail server
//! that is down, a restart with undelivered rows, a message refused for good.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tessera::config::EmailVerification;

use crate::helpers::{PASSWORD, TestApp, assert_error, eventually, restart, spawn_app_with};
use crate::smtp::{Options, SmtpServer, link, mailing};

const WAIT: Duration = Duration::from_secs(10);

async fn verify(app: &TestApp, token: &str) -> reqwest::Response {
    app.post_json("/email/verify", &json!({ "token": token }))
        .await
}

async fn request_link(app: &TestApp, email: &str) -> reqwest::Response {
    app.post_json("/email/verification", &json!({ "email": email }))
        .await
}

fn email() -> String {
    format!("v-{}@example.com", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn registration_sends_a_link_that_verifies_once() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Optional)).await;
    let address = email();
    let res = app.register(&address, PASSWORD).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.json::<Value>().await.unwrap()["email_verified"], false);

    let mail = server.wait_for(1, WAIT).await.remove(0);
    assert_eq!(
        mail.header("X-Test-Envelope-To").as_deref(),
        Some(address.as_str())
    );
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("Confirm your email address")
    );
    let (action, token) = link(&mail);
    assert_eq!(action, "verify_email");
    assert!(token.len() >= 43, "{token}"); // 256 bits, base64url

    let res = verify(&app, &token).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"email_verified": true})
    );
    let again = assert_error(
        verify(&app, &token).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await;
    assert_eq!(again["error_reason"], "used");
    let kinds = app.audit_kinds().await;
    assert!(kinds.contains(&"email_verified".to_owned()), "{kinds:?}");

    // Verified: asking again sends nothing.
    assert_eq!(
        request_link(&app, &address).await.status(),
        StatusCode::ACCEPTED
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn me_and_the_access_token_say_whether_the_address_is_verified() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Optional)).await;
    let address = email();
    app.register(&address, PASSWORD).await;
    let tokens = app.login_ok(&address).await;
    assert_eq!(tokens.claims()["email_verified"], false);
    assert_eq!(tokens.claims()["is_anonymous"], false);
    let me = |token: String| {
        let app = &app;
        async move { app.me(&token).await.json::<Value>().await.unwrap() }
    };
    assert_eq!(me(tokens.access.clone()).await["email_verified"], false);

    let (_, token) = link(&server.wait_for(1, WAIT).await[0]);
    assert_eq!(verify(&app, &token).await.status(), StatusCode::OK);
    // The token issued before keeps its claim; `GET /me` reads the address's state now,
    // even on a token it has answered for before.
    assert_eq!(me(tokens.access.clone()).await["email_verified"], true);
    let refreshed = app.refresh_ok(&tokens.refresh).await;
    assert_eq!(refreshed.claims()["email_verified"], true);
    assert_eq!(
        app.login_ok(&address).await.claims()["email_verified"],
        true
    );
    let body = me(refreshed.access).await;
    assert_eq!(body["email"], address.as_str());
    assert_eq!(body["email_verified"], true);
}

/// `GET /me` remembers that an address is not verified for a moment only (a second):
/// a verification this instance made shows at once, one it did not see (another
/// instance's; here written to the database behind its back) once that has passed.
#[tokio::test]
async fn me_shows_a_verification_it_made_at_once_and_one_it_did_not_see_soon() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Optional)).await;
    let (seen, unseen) = (email(), email());
    app.register(&seen, PASSWORD).await;
    app.register(&unseen, PASSWORD).await;
    let (by_link, behind) = (app.login_ok(&seen).await, app.login_ok(&unseen).await);
    // A remembered profile serves only tokens issued two seconds or more before it was
    // read: past that, the next `GET /me` of each is remembered.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let verified = |token: String| {
        let app = &app;
        async move { app.me(&token).await.json::<Value>().await.unwrap()["email_verified"] == true }
    };
    assert!(!verified(by_link.access.clone()).await);
    assert!(!verified(behind.access.clone()).await);

    let mails = server.wait_for(2, WAIT).await;
    let to_seen = mails
        .iter()
        .find(|m| m.header("To").is_some_and(|to| to.contains(&seen)))
        .expect("a link to the first address");
    assert_eq!(
        verify(&app, &link(to_seen).1).await.status(),
        StatusCode::OK
    );
    assert!(verified(by_link.access.clone()).await);

    let mut db = app.db().await;
    sqlx::query("UPDATE users SET email_verified = TRUE WHERE email = $1")
        .bind(&unseen)
        .execute(&mut db)
        .await
        .unwrap();
    eventually("GET /me shows the verification it did not see", || {
        verified(behind.access.clone())
    })
    .await;
}

#[tokio::test]
async fn with_verification_off_registration_sends_nothing_but_a_link_can_be_asked_for() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Off)).await;
    let address = email();
    app.register(&address, PASSWORD).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(server.messages().is_empty());
    assert_eq!(
        request_link(&app, &address).await.status(),
        StatusCode::ACCEPTED
    );
    let (_, token) = link(&server.wait_for(1, WAIT).await[0]);
    assert_eq!(verify(&app, &token).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_newer_link_makes_the_older_one_unknown_and_an_expired_one_says_so() {
    let server = SmtpServer::start(Options::default()).await;
    let mut settings = mailing(&server, EmailVerification::Optional);
    settings.email.verify_ttl_secs = 2;
    let app = spawn_app_with(settings).await;
    let address = email();
    app.register(&address, PASSWORD).await;
    let (_, first) = link(&server.wait_for(1, WAIT).await[0]);
    request_link(&app, &address).await;
    let (_, second) = link(&server.wait_for(2, WAIT).await[1]);
    assert_ne!(first, second);
    let old = assert_error(
        verify(&app, &first).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await;
    assert_eq!(old["error_reason"], "unknown");

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let late = assert_error(
        verify(&app, &second).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await;
    assert_eq!(late["error_reason"], "expired");
}

#[tokio::test]
async fn bad_tokens_and_bad_input_get_the_contract_answers() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Optional)).await;
    let forged = "A".repeat(43);
    for token in ["junk", forged.as_str(), ""] {
        let body = assert_error(
            verify(&app, token).await,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
        )
        .await;
        assert_eq!(body["error_reason"], "unknown", "{token}");
    }
    for body in [
        json!({}),
        json!({"token": 5}),
        json!({"email": "x@example.com"}),
    ] {
        let res = app.post_json("/email/verify", &body).await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    for body in [
        json!({}),
        json!({"email": "not an email"}),
        json!({"email": 7}),
    ] {
        let res = app.post_json("/email/verification", &body).await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
}

#[tokio::test]
async fn asking_for_a_link_answers_alike_for_unknown_verified_and_unverified_addresses() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Off)).await;
    let unverified = email();
    app.register(&unverified, PASSWORD).await;
    let mut answers = Vec::new();
    for address in [email(), unverified.clone()] {
        let res = request_link(&app, &address).await;
        let status = res.status();
        let headers: Vec<String> = res
            .headers()
            .keys()
            .filter(|k| *k != "date" && *k != "x-request-id")
            .map(|k| k.to_string())
            .collect();
        answers.push((status, headers, res.text().await.unwrap()));
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0].0, StatusCode::ACCEPTED);
    // Only the account's address got mail.
    let mails = server.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(server.messages().len(), 1);
    assert_eq!(
        mails[0].header("X-Test-Envelope-To").as_deref(),
        Some(unverified.as_str())
    );
}

#[tokio::test]
async fn asking_for_links_is_throttled_per_address_whether_or_not_it_has_an_account() {
    let server = SmtpServer::start(Options::default()).await;
    let mut settings = mailing(&server, EmailVerification::Off);
    settings.email.per_address_per_hour = 2;
    let app = spawn_app_with(settings).await;
    let known = email();
    app.register(&known, PASSWORD).await;
    for address in [known.clone(), email()] {
        for _ in 0..2 {
            assert_eq!(
                request_link(&app, &address).await.status(),
                StatusCode::ACCEPTED
            );
        }
        let res = request_link(&app, &address.to_uppercase()).await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let wait: u64 = res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3600).contains(&wait), "{wait}");
        assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    }
    // Two links for the known address, none for the other.
    server.wait_for(2, WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(server.messages().len(), 2);
}

#[tokio::test]
async fn a_mail_server_that_is_down_gets_the_message_once_it_is_back() {
    let mut server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Optional)).await;
    server.pause().await;
    let address = email();
    // The request does not wait on the mail server.
    let started = std::time::Instant::now();
    assert_eq!(
        app.register(&address, PASSWORD).await.status(),
        StatusCode::CREATED
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(3)).await; // a few failed attempts
    assert!(app.state.auth.store.outbox_len().await.unwrap() >= 1);
    server.resume().await;
    let (_, token) = link(&server.wait_for(1, WAIT).await[0]);
    assert_eq!(verify(&app, &token).await.status(), StatusCode::OK);
    wait_until_empty(&app).await;
}

#[tokio::test]
async fn undelivered_messages_survive_a_restart_and_are_sealed_at_rest() {
    let mut server = SmtpServer::start(Options::default()).await;
    let settings = mailing(&server, EmailVerification::Optional);
    let app = spawn_app_with(settings.clone()).await;
    server.pause().await;
    let address = email();
    app.register(&address, PASSWORD).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What the database holds names neither the address nor a token.
    let mut db = app.db().await;
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT payload FROM outbox")
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert_eq!(payloads.len(), 1);
    let text = String::from_utf8_lossy(&payloads[0]);
    assert!(
        !text.contains(&address) && !text.contains("token"),
        "{text}"
    );
    drop(db);
    let app = restart(app, &settings).await;
    // The old instance's sender notices within a second that its instance is gone; only
    // the new one can deliver once the server is back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.resume().await;
    let mail = server.wait_for(1, WAIT).await.remove(0);
    assert_eq!(
        mail.header("X-Test-Envelope-To").as_deref(),
        Some(address.as_str())
    );
    let (_, token) = link(&mail);
    assert_eq!(verify(&app, &token).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_message_refused_for_good_is_dropped_with_an_audit_row() {
    let server = SmtpServer::start(Options {
        refuse: Some("550"),
        ..Options::default()
    })
    .await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Optional)).await;
    app.register(&email(), PASSWORD).await;
    wait_until_empty(&app).await;
    let mut db = app.db().await;
    let detail: String = sqlx::query_scalar(app.pick(
        "SELECT detail::text FROM audit_events WHERE kind = 'email_delivery_failed'",
        "SELECT detail FROM audit_events WHERE kind = 'email_delivery_failed'",
    ))
    .fetch_one(&mut db)
    .await
    .unwrap();
    let detail: Value = serde_json::from_str(&detail).unwrap();
    assert_eq!(detail["template"], "verify_email");
    assert_eq!(detail["reason"], "refused");
    assert!(server.messages().is_empty());
}

async fn wait_until_empty(app: &TestApp) {
    for _ in 0..200 {
        if app.state.auth.store.outbox_len().await.unwrap() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the outbox did not empty within 10 s");
}

#[tokio::test]
async fn with_verification_required_only_a_correct_password_learns_the_address_is_unverified() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Required)).await;
    let address = email();
    app.register(&address, PASSWORD).await;
    // A wrong password answers as for any account, and as for no account.
    let wrong = app.login(&address, "not the password").await;
    let wrong = assert_error(wrong, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let nobody = app.login(&email(), "not the password").await;
    assert_eq!(
        assert_error(nobody, StatusCode::UNAUTHORIZED, "invalid_credentials").await,
        wrong
    );
    // The correct one: 403, and no session.
    let res = app.login(&address, PASSWORD).await;
    let body = assert_error(res, StatusCode::FORBIDDEN, "email_not_verified").await;
    assert!(body.get("access_token").is_none());
    let mut db = app.db().await;
    let sessions: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(sessions, 0);
    // Verified, the same login works.
    let (_, token) = link(&server.wait_for(1, WAIT).await[0]);
    assert_eq!(verify(&app, &token).await.status(), StatusCode::OK);
    app.login_ok(&address).await;
}
