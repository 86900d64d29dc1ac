//! Security notices (`email.notify`) through HTTP with a real SMTP server: `new_device`,
//! `password_changed` (a change and a reset), `session_reuse_detected`, and none when
//! `email.notify` leaves them out. `email_changed` is in `email_change.rs`.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tessera::config::{EmailVerification, NoticeKind};

use crate::helpers::{PASSWORD, TestApp, Tokens, spawn_app_with};
use crate::smtp::{Mail, Options, SmtpServer, link, mailing};

const WAIT: Duration = Duration::from_secs(10);
const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
const SAFARI: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Safari/604.1";

/// A login from `ip` (believed: 127.0.0.1 is a trusted proxy here) with `user_agent`
/// and, if given, a device token.
async fn login_from(
    app: &TestApp,
    email: &str,
    ip: &str,
    user_agent: &str,
    device: Option<&str>,
) -> Tokens {
    let res = app
        .client
        .post(app.url("/login"))
        .header("X-Forwarded-For", ip)
        .header(reqwest::header::USER_AGENT, user_agent)
        .json(&json!({"email": email, "password": PASSWORD, "device_token": device}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    Tokens::from_body(res.json().await.unwrap())
}

async fn register_from(app: &TestApp, ip: &str, user_agent: &str) -> String {
    let email = format!("n-{}@example.com", uuid::Uuid::new_v4().simple());
    let res = app
        .client
        .post(app.url("/users"))
        .header("X-Forwarded-For", ip)
        .header(reqwest::header::USER_AGENT, user_agent)
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    email
}

fn subjects(mails: &[Mail]) -> Vec<String> {
    mails.iter().map(|m| m.header("Subject").unwrap()).collect()
}

/// No message arrives within a while (the sender polls every second).
async fn assert_quiet(server: &SmtpServer, expected: usize) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = subjects(&server.messages());
    assert_eq!(got.len(), expected, "{got:?}");
}

async fn app_with(
    server: &SmtpServer,
    tune: impl FnOnce(&mut tessera::config::Settings),
) -> TestApp {
    let mut settings = mailing(server, EmailVerification::Off);
    settings.server.trusted_proxies = vec!["127.0.0.1".into()];
    tune(&mut settings);
    spawn_app_with(settings).await
}

#[tokio::test]
async fn a_login_from_a_new_network_and_browser_without_a_device_token_is_noticed() {
    let server = SmtpServer::start(Options::default()).await;
    let app = app_with(&server, |_| {}).await;
    let email = register_from(&app, "203.0.113.7", FIREFOX).await;

    // Where the account was registered, with the browser updated since: not new.
    let first = login_from(
        &app,
        &email,
        "203.0.113.99",
        &FIREFOX.replace("128", "133"),
        None,
    )
    .await;
    assert_quiet(&server, 0).await;

    // Another network and another browser, no device token: noticed, once.
    login_from(&app, &email, "198.51.100.4", SAFARI, None).await;
    let mail = server.wait_for(1, WAIT).await.remove(0);
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("New sign-in to your account")
    );
    assert_eq!(
        mail.header("X-Test-Envelope-To").as_deref(),
        Some(email.as_str())
    );
    let text = mail.text();
    assert!(
        text.contains("198.51.100.4") && text.contains("iPhone"),
        "{text}"
    );
    assert!(
        !text.contains("?action="),
        "a notice carries no link that acts: {text}"
    );
    login_from(&app, &email, "198.51.100.4", SAFARI, None).await;
    assert_quiet(&server, 1).await;

    // A known device token vouches for the client wherever it is.
    let device = first.body["device_token"].as_str().unwrap().to_owned();
    login_from(&app, &email, "192.0.2.1", "curl/8.5.0", Some(&device)).await;
    assert_quiet(&server, 1).await;
}

#[tokio::test]
async fn a_changed_or_reset_password_is_noticed_and_no_notice_carries_a_link() {
    let server = SmtpServer::start(Options::default()).await;
    let app = app_with(&server, |_| {}).await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    let res = app
        .change_password(&tokens.access, PASSWORD, "a new password 1")
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let mail = server.wait_for(1, WAIT).await.remove(0);
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("Your password was changed")
    );
    assert_eq!(
        mail.header("X-Test-Envelope-To").as_deref(),
        Some(email.as_str())
    );
    assert!(!mail.text().contains("?action="));

    // A reset: the link, then the notice once it is used.
    app.post_json("/password/forgot", &json!({ "email": email }))
        .await;
    let (_, token) = link(&server.wait_for(2, WAIT).await[1]);
    let res = app
        .post_json(
            "/password/reset",
            &json!({"token": token, "new_password": "another password 2"}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let mails = server.wait_for(3, WAIT).await;
    assert_eq!(
        subjects(&mails),
        [
            "Your password was changed",
            "Reset your password",
            "Your password was changed"
        ]
    );
    assert!(!mails[2].text().contains("?action="));
}

#[tokio::test]
async fn a_replayed_refresh_token_ends_the_session_and_is_noticed_once() {
    let server = SmtpServer::start(Options::default()).await;
    let app = app_with(&server, |s| s.tokens.refresh_reuse_grace_secs = 0).await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    app.refresh_ok(&tokens.refresh).await;
    for _ in 0..2 {
        let res = app.refresh(&tokens.refresh).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    }
    let mail = server.wait_for(1, WAIT).await.remove(0);
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("A session of your account was ended for your safety")
    );
    assert_eq!(
        mail.header("X-Test-Envelope-To").as_deref(),
        Some(email.as_str())
    );
    assert_quiet(&server, 1).await;
}

#[tokio::test]
async fn notices_left_out_of_email_notify_are_not_sent() {
    let server = SmtpServer::start(Options::default()).await;
    let app = app_with(&server, |s| {
        s.email.notify = vec![NoticeKind::NewDevice];
        s.tokens.refresh_reuse_grace_secs = 0;
    })
    .await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    app.refresh_ok(&tokens.refresh).await;
    app.refresh(&tokens.refresh).await;
    let tokens = app.login_ok(&email).await;
    let res = app
        .change_password(&tokens.access, PASSWORD, "a new password 1")
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    // An email change still sends its link, but no notice to the old address.
    let res = app
        .client
        .put(app.url("/me/email"))
        .bearer_auth(&tokens.access)
        .json(&json!({
            "new_email": format!("elsewhere-{}@example.com", uuid::Uuid::new_v4().simple()),
            "password": "a new password 1",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let mails = server.wait_for(1, WAIT).await;
    assert_eq!(subjects(&mails), ["Confirm your new email address"]);
    assert_quiet(&server, 1).await;
    let body: Value = app.me(&tokens.access).await.json().await.unwrap();
    assert_eq!(body["email"], email.as_str());
}
