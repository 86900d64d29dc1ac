//! Client addresses behind trusted proxies: how `X-Forwarded-For` is read, IPv6
//! clients limited per prefix, and the throttle's memory under a flood of new keys.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

fn behind_proxy() -> tessera::config::Settings {
    let mut settings = test_settings();
    settings.server.trusted_proxies = vec!["127.0.0.1".into(), "10.0.0.0/8".into()];
    settings
}

/// The IP that a login with `X-Forwarded-For: chain` is recorded with.
async fn recorded_ip(app: &TestApp, email: &str, chain: &str) -> String {
    let res = app
        .client
        .post(app.url("/login"))
        .header("x-forwarded-for", chain)
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let tokens = Tokens::from_body(res.json().await.unwrap());
    let sessions = app.sessions(&tokens.access).await;
    let mine = sessions
        .iter()
        .find(|s| s["id"] == tokens.session_id.as_str())
        .unwrap();
    assert_eq!(mine["login_ip"], mine["ip"]);
    mine["login_ip"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn forwarded_for_is_walked_from_the_right_and_stops_at_the_first_bad_entry() {
    let app = spawn_app_with(behind_proxy()).await;
    let email = app.new_user().await;
    for (chain, client) in [
        ("203.0.113.9", "203.0.113.9"),
        // Junk or a spoofed address on the left (written by the client) never matters.
        ("x, 203.0.113.9", "203.0.113.9"),
        ("unknown, 203.0.113.9", "203.0.113.9"),
        ("198.51.100.66, 203.0.113.9, 10.0.0.7", "203.0.113.9"),
        // Some proxies write ports.
        ("203.0.113.9:4711", "203.0.113.9"),
        ("[2001:db8::9]:4711", "2001:db8::9"),
        // A bad entry right of the client: the last trusted hop is all that is known.
        ("203.0.113.9, unknown, 10.0.0.7", "10.0.0.7"),
        ("203.0.113.9, x", "127.0.0.1"),
    ] {
        assert_eq!(recorded_ip(&app, &email, chain).await, client, "{chain}");
    }
}

#[tokio::test]
async fn ipv6_clients_of_one_prefix_share_one_bucket() {
    let mut settings = behind_proxy();
    settings.login.per_ip_per_minute = 3;
    let app = spawn_app_with(settings).await;
    let login_from = |ip: &'static str| {
        app.client
            .post(app.url("/login"))
            .header("x-forwarded-for", ip)
            .json(&json!({"email": "ghost@example.com", "password": "wrong password"}))
            .send()
    };
    for ip in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:abcd::3"] {
        assert_eq!(
            login_from(ip).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let res = login_from("2001:db8:1:2:ffff:ffff:ffff:ffff")
        .await
        .unwrap();
    assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(
        login_from("2001:db8:1:3::1").await.unwrap().status(),
        StatusCode::UNAUTHORIZED,
        "the next /64 is another bucket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_addresses_and_emails_keeps_the_throttle_tables_bounded() {
    let mut settings = behind_proxy();
    settings.login.max_tracked_keys = 200;
    let app = spawn_app_with(settings).await;
    let attempt = |i: u32| {
        let ip = format!("2001:db8:{:x}:{:x}::1", i >> 16, i & 0xffff);
        app.client
            .post(app.url("/login"))
            .header("x-forwarded-for", ip)
            .json(&json!({"email": format!("flood-{i}@example.com"), "password": "wrong pw"}))
            .send()
    };
    let mut largest = (0, 0);
    for chunk in (0..1200u32).collect::<Vec<_>>().chunks(16) {
        for res in futures_util::future::join_all(chunk.iter().map(|i| attempt(*i))).await {
            assert_eq!(res.unwrap().status(), StatusCode::UNAUTHORIZED);
        }
        let (ips, accounts, _) = app.state.auth.throttle.tracked_keys();
        largest = (largest.0.max(ips), largest.1.max(accounts));
    }
    assert!(
        largest.0 > 150 && largest.1 > 150,
        "the flood filled the tables: {largest:?}"
    );
    assert!(largest.0 <= 300 && largest.1 <= 300, "bounded: {largest:?}");
}

/// A login and a refresh sent with `X-Request-Id: id`: the id each answer echoes.
async fn login_and_refresh_as(app: &TestApp, email: &str, id: &str) -> (String, String) {
    let echoed =
        |res: &reqwest::Response| res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let res = app
        .client
        .post(app.url("/login"))
        .header("x-request-id", id)
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let login = echoed(&res);
    let tokens = Tokens::from_body(res.json().await.unwrap());
    let res = app
        .client
        .post(app.url("/refresh"))
        .header("x-request-id", id)
        .json(&json!({"refresh_token": tokens.refresh}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    (login, echoed(&res))
}

/// The request ids of the audit rows of `kind`, oldest first.
async fn audited_ids(app: &TestApp, kind: &str) -> Vec<Option<String>> {
    let mut db = app.db().await;
    sqlx::query_scalar("SELECT request_id FROM audit_events WHERE kind = $1 ORDER BY id")
        .bind(kind)
        .fetch_all(&mut db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_trusted_proxys_request_id_links_the_answer_and_the_audit_rows() {
    let app = spawn_app_with(behind_proxy()).await;
    let email = app.new_user().await;
    let (login, refresh) = login_and_refresh_as(&app, &email, "lb-7f3a.42:edge/1").await;
    assert_eq!(
        (login.as_str(), refresh.as_str()),
        ("lb-7f3a.42:edge/1", "lb-7f3a.42:edge/1")
    );
    assert_eq!(
        audited_ids(&app, "login_succeeded").await,
        [Some("lb-7f3a.42:edge/1".to_owned())]
    );
    // The refresh row is written by the rotation's own statement.
    assert_eq!(
        audited_ids(&app, "refresh").await,
        [Some("lb-7f3a.42:edge/1".to_owned())]
    );
    // Malformed ids (spaces, too long) are replaced by new ones.
    for bad in ["two words", &"x".repeat(129)] {
        let (login, _) = login_and_refresh_as(&app, &email, bad).await;
        assert!(uuid::Uuid::parse_str(&login).is_ok(), "{login}");
        let ids = audited_ids(&app, "login_succeeded").await;
        assert_eq!(ids.last().unwrap().as_deref(), Some(login.as_str()));
    }
    // GET /admin/audit shows them.
    let admin = app.admin().await;
    let events: serde_json::Value = app
        .call(reqwest::Method::GET, "/admin/audit", &admin.access, None)
        .await
        .json()
        .await
        .unwrap();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["request_id"] == "lb-7f3a.42:edge/1"),
        "{events}"
    );
}

#[tokio::test]
async fn a_request_id_from_a_peer_that_is_not_a_trusted_proxy_is_not_taken() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let (login, refresh) = login_and_refresh_as(&app, &email, "forged-id").await;
    assert!(uuid::Uuid::parse_str(&login).is_ok(), "{login}");
    assert_ne!(login, refresh, "each request its own id");
    assert_eq!(audited_ids(&app, "login_succeeded").await, [Some(login)]);
    assert_eq!(audited_ids(&app, "refresh").await, [Some(refresh)]);
}
