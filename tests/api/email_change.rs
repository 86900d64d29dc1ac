//! `PUT /me/email` and `POST /email/change/confirm` through HTTP with a real SMTP
//! server: nothing changes before the new address confirms, the old address is told,
//! a taken address, and `GET /me` showing the new address on every instance.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tessera::config::EmailVerification;

use crate::helpers::*;
use crate::smtp::{Mail, Options, SmtpServer, link, mailing};

const WAIT: Duration = Duration::from_secs(10);

fn address() -> String {
    format!("c-{}@example.com", uuid::Uuid::new_v4().simple())
}

async fn change(app: &TestApp, access: &str, new_email: &str, password: &str) -> reqwest::Response {
    app.call(
        Method::PUT,
        "/me/email",
        access,
        Some(&json!({ "new_email": new_email, "password": password })),
    )
    .await
}

async fn confirm(app: &TestApp, token: &str) -> reqwest::Response {
    app.post_json("/email/change/confirm", &json!({ "token": token }))
        .await
}

fn to(mail: &Mail) -> String {
    mail.header("X-Test-Envelope-To").unwrap()
}

async fn me_email(app: &TestApp, access: &str) -> String {
    let res = app.me(access).await;
    assert_eq!(res.status(), StatusCode::OK);
    res.json::<Value>().await.unwrap()["email"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn the_new_address_confirms_the_old_one_is_told_and_tokens_follow() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Off)).await;
    let old = app.new_user().await;
    let t = app.login_ok(&old).await;
    assert_eq!(me_email(&app, &t.access).await, old);
    let new = address();

    let res = change(&app, &t.access, &new, PASSWORD).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let mails = server.wait_for(2, WAIT).await;
    let confirmation = mails
        .iter()
        .find(|m| to(m) == new)
        .expect("a link to the new address");
    let notice = mails
        .iter()
        .find(|m| to(m) == old)
        .expect("a notice to the old address");
    let (action, token) = link(confirmation);
    assert_eq!(action, "confirm_email_change");
    let notice_text = notice.text();
    assert!(notice_text.contains(&new), "{notice_text}");
    assert!(
        !notice_text.contains("token="),
        "a notice carries no link that acts"
    );

    // Nothing changed yet.
    assert_eq!(me_email(&app, &t.access).await, old);
    app.login_ok(&old).await;

    let res = confirm(&app, &token).await;
    assert_eq!(res.status(), StatusCode::OK);
    let user: Value = res.json().await.unwrap();
    assert_eq!(user["email"], new.as_str());
    assert_eq!(user["email_verified"], true);
    // Access tokens issued before no longer vouch for the old address; the session goes
    // on, and its next token shows the new one.
    assert_invalid_token(app.me(&t.access).await).await;
    let next = app.refresh_ok(&t.refresh).await;
    assert_eq!(me_email(&app, &next.access).await, new);
    app.login_ok(&new).await;
    assert_error(
        app.login(&old, PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    // The old address is free again.
    assert_eq!(
        app.register(&old, PASSWORD).await.status(),
        StatusCode::CREATED
    );

    let again = assert_error(
        confirm(&app, &token).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await;
    assert_eq!(again["error_reason"], "used");
    let kinds = app.audit_kinds().await;
    for kind in ["email_change_requested", "email_changed"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind}: {kinds:?}");
    }
}

#[tokio::test]
async fn a_wrong_password_or_the_same_address_changes_and_sends_nothing() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Off)).await;
    let old = app.new_user().await;
    let t = app.login_ok(&old).await;
    let res = change(&app, &t.access, &address(), "not the password").await;
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let res = change(&app, &t.access, &old.to_uppercase(), PASSWORD).await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    for body in [
        json!({}),
        json!({"new_email": "nope", "password": PASSWORD}),
    ] {
        let res = app
            .call(Method::PUT, "/me/email", &t.access, Some(&body))
            .await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let res = app
        .client
        .put(app.url("/me/email"))
        .json(&json!({"new_email": address(), "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_invalid_token(res).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(server.messages().is_empty());
    assert_eq!(me_email(&app, &t.access).await, old);
}

#[tokio::test]
async fn a_taken_address_gets_no_link_and_one_taken_meanwhile_is_a_conflict() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Off)).await;
    let taken = app.new_user().await;
    let mine = app.new_user().await;
    let t = app.login_ok(&mine).await;
    // Taken already: the same answer, but no mail to the other account's address.
    assert_eq!(
        change(&app, &t.access, &taken, PASSWORD).await.status(),
        StatusCode::ACCEPTED
    );
    // Free now, taken before the link is used.
    let wanted = address();
    assert_eq!(
        change(&app, &t.access, &wanted, PASSWORD).await.status(),
        StatusCode::ACCEPTED
    );
    let mails = server.wait_for(2, WAIT).await; // the link to `wanted`, the notice to `mine`
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(server.messages().len(), 2);
    assert!(server.messages().iter().all(|m| to(m) != taken));
    let confirmation = mails.iter().find(|m| to(m) == wanted).unwrap();
    let (_, token) = link(confirmation);
    assert_eq!(
        app.register(&wanted, PASSWORD).await.status(),
        StatusCode::CREATED
    );
    assert_error(
        confirm(&app, &token).await,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;
    assert_eq!(me_email(&app, &t.access).await, mine);
}

/// Instance B remembered the old address for `GET /me`; the change is confirmed on A.
/// B shows the new address for the session's next token, told nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_shows_the_new_address_without_being_told() {
    crate::shared_backend_only!(); // two instances need Redis
    let server = SmtpServer::start(Options::default()).await;
    let settings = mailing(&server, EmailVerification::Off);
    let a = spawn_app_with(settings.clone()).await;
    let b = spawn_app_with(settings).await;
    let old = a.new_user().await;
    let t = a.login_ok(&old).await;
    // Let B remember the address for good (read well after the token's issue).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(me_email(&b, &t.access).await, old);
    assert_eq!(me_email(&b, &t.access).await, old);

    let new = address();
    assert_eq!(
        change(&a, &t.access, &new, PASSWORD).await.status(),
        StatusCode::ACCEPTED
    );
    let mails = server.wait_for(2, WAIT).await;
    let (_, token) = link(mails.iter().find(|m| to(m) == new).unwrap());
    assert_eq!(confirm(&a, &token).await.status(), StatusCode::OK);
    let next = a.refresh_ok(&t.refresh).await;
    assert_eq!(me_email(&b, &next.access).await, new);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(me_email(&b, &next.access).await, new);
}
