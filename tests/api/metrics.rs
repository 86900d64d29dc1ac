//! Prometheus metrics on their own listener (`metrics.listen`): what happened through
//! the API is counted, with route patterns for labels, and the gauges describe the
//! server as it is.

use reqwest::StatusCode;

use crate::helpers::*;
use crate::outage::app_behind_redis_proxy;

/// Settings with the metrics listener on a free port.
fn with_metrics() -> tessera::config::Settings {
    let mut s = test_settings();
    s.metrics.listen = "127.0.0.1:0".into();
    s
}

/// One scrape: the text, after checking the answer's Content-Type.
async fn scrape(app: &TestApp) -> String {
    let port = app.metrics_port.expect("a metrics listener");
    let res = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    res.text().await.unwrap()
}

/// The value of the sample named exactly `series` (name and labels), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

fn count(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test]
async fn logins_refreshes_revocations_and_requests_are_counted_by_outcome() {
    let mut settings = with_metrics();
    // A second presentation of a rotated token is reuse at once.
    settings.tokens.refresh_reuse_grace_secs = 0;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;

    let first = app.login_ok(&email).await;
    assert_eq!(
        app.login(&email, "not the password").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let second = app.refresh_ok(&first.refresh).await;
    // Reuse: the session ends (one session revocation) ...
    assert_eq!(
        app.refresh(&first.refresh).await.status(),
        StatusCode::BAD_REQUEST
    );
    // ... so its current token is refused as revoked.
    assert_eq!(
        app.refresh(&second.refresh).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.refresh("not-a-token").await.status(),
        StatusCode::BAD_REQUEST
    );
    let other = app.login_ok(&email).await;
    assert_eq!(
        app.logout(&other.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    // A route with a parameter, answered 401 (no token).
    let user_id = app.user_id(&email).await;
    let res = app.get(&format!("/admin/users/{user_id}")).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // The API's own port serves no metrics.
    assert_eq!(app.get("/metrics").await.status(), StatusCode::NOT_FOUND);

    let text = scrape(&app).await;
    assert_eq!(count(&text, r#"tessera_logins_total{outcome="ok"}"#), 2.0);
    assert_eq!(
        count(&text, r#"tessera_logins_total{outcome="bad_credentials"}"#),
        1.0
    );
    for (outcome, n) in [
        ("rotated", 1.0),
        ("reused", 1.0),
        ("revoked", 1.0),
        ("unknown", 1.0),
    ] {
        let series = format!(r#"tessera_refreshes_total{{outcome="{outcome}"}}"#);
        assert_eq!(count(&text, &series), n, "{series}");
    }
    // The reuse and the logout.
    assert_eq!(
        count(&text, r#"tessera_revocations_total{kind="session"}"#),
        2.0
    );
    assert_eq!(
        count(
            &text,
            r#"tessera_http_requests_total{route="/login",method="POST",status="2xx"}"#
        ),
        2.0
    );
    assert_eq!(
        count(
            &text,
            r#"tessera_http_requests_total{route="/refresh",method="POST",status="4xx"}"#
        ),
        3.0
    );
    assert_eq!(
        count(
            &text,
            r#"tessera_http_requests_total{route="/admin/users/{id}",method="GET",status="4xx"}"#
        ),
        1.0
    );
    assert_eq!(
        count(
            &text,
            r#"tessera_http_requests_total{route="unmatched",method="GET",status="4xx"}"#
        ),
        1.0
    );
    // Labels are route patterns: no user id, no token, no address in any of them.
    assert!(!text.contains(&user_id.to_string()), "{text}");
    assert!(!text.contains(&email), "{text}");
    assert!(
        count(
            &text,
            r#"tessera_http_request_duration_seconds_count{route="/refresh",method="POST"}"#
        ) == 4.0
    );
    // Registration and two logins with the password, one without.
    assert!(count(&text, "tessera_password_hash_seconds_count") >= 4.0);
    assert!(count(&text, "tessera_password_hash_wait_seconds_count") >= 4.0);
    assert_eq!(count(&text, "tessera_password_hash_queue_depth"), 0.0);
    assert_eq!(
        count(&text, "tessera_db_max_connections"),
        app.settings.database.max_connections as f64
    );
    let age = count(&text, "tessera_signing_key_age_seconds");
    assert!((0.0..600.0).contains(&age), "{age}");
    let redis_round_trips = count(&text, "tessera_redis_command_seconds_count");
    match secrecy::ExposeSecret::expose_secret(&app.settings.redis.url).is_empty() {
        true => assert_eq!(redis_round_trips, 0.0),
        false => assert!(redis_round_trips > 0.0),
    }
    assert_eq!(count(&text, "tessera_redis_errors_total"), 0.0);

    // The acquire probe runs once a second.
    eventually("the database acquire probe ran", || async {
        count(&scrape(&app).await, "tessera_db_acquire_seconds_count") >= 1.0
    })
    .await;
}

#[tokio::test]
async fn a_redis_that_fails_is_counted() {
    crate::shared_backend_only!();
    let (app, proxy) = app_behind_redis_proxy(|s| s.metrics.listen = "127.0.0.1:0".into()).await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    assert_eq!(
        count(&scrape(&app).await, "tessera_redis_errors_total"),
        0.0
    );
    proxy.cut();
    // Logging out needs Redis: 503, and the failed command is counted.
    assert_eq!(
        app.logout(&tokens.access, None).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(count(&scrape(&app).await, "tessera_redis_errors_total") >= 1.0);
    proxy.restore();
}

#[tokio::test]
async fn a_metrics_address_in_use_stops_the_start_with_what_to_do() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut settings = test_settings();
    settings.metrics.listen = taken.local_addr().unwrap().to_string();
    let err = match tessera::startup::Application::build(settings).await {
        Ok(_) => panic!("started on a taken metrics address"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("cannot listen for metrics"), "{err}");
    assert!(err.contains("metrics.listen"), "{err}");
}
