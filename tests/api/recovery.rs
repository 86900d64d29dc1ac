//! Password recovery through HTTP with a real SMTP server: `POST /password/forgot`
//! emails a link, `POST /password/reset` uses it. A reset ends every session, forgets
//! the failed logins and counts the address as verified; the link's reasons; and an
//! unknown address is indistinguishable (body, status and timing).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tessera::config::EmailVerification;

use crate::helpers::*;
use crate::smtp::{Options, SmtpServer, link, mailing};

const WAIT: Duration = Duration::from_secs(10);
const NEW_PASSWORD: &str = "a brand new passphrase";

async fn forgot(app: &TestApp, email: &str) -> reqwest::Response {
    app.post_json("/password/forgot", &json!({ "email": email }))
        .await
}

async fn reset(app: &TestApp, token: &str, password: &str) -> reqwest::Response {
    app.post_json(
        "/password/reset",
        &json!({ "token": token, "new_password": password }),
    )
    .await
}

#[tokio::test]
async fn a_reset_ends_every_session_and_only_the_new_password_works() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Off)).await;
    let email = app.new_user().await;
    let one = app.login_ok(&email).await;
    let two = app.login_ok(&email).await;

    assert_eq!(forgot(&app, &email).await.status(), StatusCode::ACCEPTED);
    let mail = server.wait_for(1, WAIT).await.remove(0);
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("Reset your password")
    );
    let (action, token) = link(&mail);
    assert_eq!(action, "reset_password");
    // Asking for a link changed nothing yet.
    assert_eq!(app.me(&one.access).await.status(), StatusCode::OK);

    let res = reset(&app, &token, NEW_PASSWORD).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    for t in [&one, &two] {
        assert_invalid_token(app.me(&t.access).await).await;
        assert_invalid_grant(app.refresh(&t.refresh).await, "revoked").await;
    }
    assert_error(
        app.login(&email, PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    app.login_ok_with(&email, NEW_PASSWORD).await;
    // The address counts as verified: the link reached it.
    let mut db = app.db().await;
    let verified: i64 = sqlx::query_scalar(
        "SELECT CAST(CASE WHEN email_verified THEN 1 ELSE 0 END AS BIGINT) FROM users \
         WHERE email = $1",
    )
    .bind(&email)
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(verified, 1);
    let kinds = app.audit_kinds().await;
    for kind in ["password_reset_requested", "password_reset"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind}: {kinds:?}");
    }

    // Used once.
    let again = reset(&app, &token, "yet another passphrase").await;
    let body = assert_error(again, StatusCode::BAD_REQUEST, "invalid_grant").await;
    assert_eq!(body["error_reason"], "used");
}

#[tokio::test]
async fn a_reset_link_after_a_newer_one_or_after_expiry_is_refused_with_its_reason() {
    let server = SmtpServer::start(Options::default()).await;
    let mut settings = mailing(&server, EmailVerification::Off);
    settings.email.reset_ttl_secs = 2;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    forgot(&app, &email).await;
    let (_, first) = link(&server.wait_for(1, WAIT).await[0]);
    forgot(&app, &email).await;
    let (_, second) = link(&server.wait_for(2, WAIT).await[1]);
    let body = assert_error(
        reset(&app, &first, NEW_PASSWORD).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await;
    assert_eq!(body["error_reason"], "unknown");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let body = assert_error(
        reset(&app, &second, NEW_PASSWORD).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await;
    assert_eq!(body["error_reason"], "expired");
    // Nothing changed: the old password still works.
    app.login_ok(&email).await;
}

#[tokio::test]
async fn a_reset_forgets_the_failed_logins_that_held_the_account() {
    let server = SmtpServer::start(Options::default()).await;
    let mut settings = mailing(&server, EmailVerification::Off);
    settings.login.free_failures = 2;
    settings.login.delay_base_secs = 60;
    settings.login.delay_max_secs = 300;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    for _ in 0..3 {
        app.login(&email, "a wrong password").await;
    }
    // A stranger's failures hold the account.
    let held = app.login(&email, PASSWORD).await;
    assert_error(held, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    forgot(&app, &email).await;
    let (_, token) = link(&server.wait_for(1, WAIT).await[0]);
    assert_eq!(
        reset(&app, &token, NEW_PASSWORD).await.status(),
        StatusCode::NO_CONTENT
    );
    app.login_ok_with(&email, NEW_PASSWORD).await;
}

#[tokio::test]
async fn bad_reset_input_gets_the_contract_answers_and_changes_nothing() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Off)).await;
    let email = app.new_user().await;
    forgot(&app, &email).await;
    let (_, token) = link(&server.wait_for(1, WAIT).await[0]);
    // Too short a password: refused before the token is touched.
    let res = reset(&app, &token, "short").await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    let forged = "B".repeat(43);
    for bad in ["junk", forged.as_str()] {
        let body = assert_error(
            reset(&app, bad, NEW_PASSWORD).await,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
        )
        .await;
        assert_eq!(body["error_reason"], "unknown");
    }
    for body in [
        json!({}),
        json!({"token": token}),
        json!({"new_password": NEW_PASSWORD}),
    ] {
        let res = app.post_json("/password/reset", &body).await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let res = app
        .post_json("/password/forgot", &json!({"email": "nope"}))
        .await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    // The link still works after all that.
    assert_eq!(
        reset(&app, &token, NEW_PASSWORD).await.status(),
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn a_disabled_account_gets_no_reset_link() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Off)).await;
    let admin = app.admin().await;
    let email = app.new_user().await;
    let id = app.user_id(&email).await;
    let res = app
        .call(
            reqwest::Method::PATCH,
            &format!("/admin/users/{id}"),
            &admin.access,
            Some(&json!({"disabled": true})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(forgot(&app, &email).await.status(), StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(server.messages().is_empty());
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// A request for a link (`path`) for an account and for unknown addresses, interleaved
/// in a random order each round: the same body, status and, by the ratio of medians,
/// timing. The account's address gets its links; the unknown ones nothing.
async fn answers_alike(path: &'static str, audited: &str) {
    // No mail server: its TLS handshakes would load the machine at random moments; the
    // work that differs between the two kinds (the lookup, the token, the outbox row) is
    // all still done.
    let mut settings = test_settings();
    settings.email.per_ip_per_hour = 100_000;
    settings.email.per_address_per_hour = 100_000;
    let app = spawn_app_with(settings).await;
    let known = app.new_user().await;
    let timed = |email: String| {
        let app = &app;
        async move {
            let started = Instant::now();
            let res = app.post_json(path, &json!({ "email": email })).await;
            let took = started.elapsed();
            assert_eq!(res.status(), StatusCode::ACCEPTED);
            (took, res.text().await.unwrap())
        }
    };
    let (mut k, mut u) = (Vec::new(), Vec::new());
    for i in 0..206 {
        let ghost = format!("ghost-{i}-{}@example.com", uuid::Uuid::new_v4().simple());
        let ((kt, kb), (ut, ub)) = if uuid::Uuid::new_v4().as_bytes()[0] & 1 == 0 {
            let a = timed(known.clone()).await;
            (a, timed(ghost).await)
        } else {
            let b = timed(ghost).await;
            (timed(known.clone()).await, b)
        };
        assert_eq!(kb, ub);
        if i >= 5 {
            k.push(kt);
            u.push(ut);
        }
    }
    let ratio = median(k).as_secs_f64() / median(u).as_secs_f64();
    eprintln!("{path}: known / unknown = {ratio:.2}");
    assert!((0.8..=1.25).contains(&ratio), "{path}: ratio {ratio:.2}");
    // The account got its links (one per request), the unknown addresses none. The
    // links go out in tasks after the answers, which lag on a loaded machine.
    eventually("every link task has run", || async {
        let kinds = app.audit_kinds().await;
        kinds.iter().filter(|k| *k == audited).count() >= 206
    })
    .await;
    let kinds = app.audit_kinds().await;
    assert_eq!(
        kinds.iter().filter(|k| *k == audited).count(),
        206,
        "{path}"
    );
}

/// Both endpoints that email an address the caller names, one after the other (so they
/// do not load the machine for each other), and never beside a browser test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgot_password_and_verification_answer_alike_for_known_and_unknown_addresses() {
    let _quiet = HEAVY.lock().await;
    answers_alike("/password/forgot", "password_reset_requested").await;
    answers_alike("/email/verification", "verification_sent").await;
}
