use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn login_returns_the_contract_token_response_with_no_store() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let res = app.login(&email, PASSWORD).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert_eq!(res.headers()["pragma"], "no-cache");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    let refresh = body["refresh_token"].as_str().unwrap();
    // Session id, generation and chain secret, then 256 random bits: 72 bytes.
    assert_eq!(refresh.len(), 96, "base64url of 72 bytes");
    assert!(
        refresh
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    // Without remember_me: the short absolute lifetime (12 h).
    let lifetime = body["refresh_token_expires_in"].as_i64().unwrap();
    assert!((43_190..=43_200).contains(&lifetime), "{lifetime}");
    assert!(uuid::Uuid::parse_str(body["session_id"].as_str().unwrap()).is_ok());

    // The database holds only the hash of the refresh token.
    let mut db = app.db().await;
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT token_hash FROM refresh_tokens")
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0], refresh.as_bytes());
    assert_eq!(stored[0].len(), 32);
}

#[tokio::test]
async fn remember_me_gets_the_long_lifetime_capped_by_idle() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let res = app
        .post_json(
            "/login",
            &json!({"email": email, "password": PASSWORD, "remember_me": true}),
        )
        .await;
    let body: Value = res.json().await.unwrap();
    // 30 days absolute, but the idle lifetime (7 days) comes first.
    assert_eq!(body["refresh_token_expires_in"], 604_800);
    let mut db = app.db().await;
    let days: f64 = sqlx::query_scalar(app.pick(
        "SELECT extract(epoch FROM expires_at - created_at)::float8 / 86400 FROM sessions",
        "SELECT (expires_at - created_at) / 86400e6 FROM sessions",
    ))
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert!((days - 30.0).abs() < 0.01, "{days}");
}

#[tokio::test]
async fn access_tokens_are_rfc9068_jwts_that_verify_against_the_jwks() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    let header = jsonwebtoken::decode_header(&tokens.access).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    let kid = header.kid.expect("kid in every header");

    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(app.jwks().await).unwrap();
    let jwk = jwks.find(&kid).expect("signing key is published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["tessera"]);
    validation.set_issuer(&[app.settings.tokens.issuer.as_str()]);
    let claims = jsonwebtoken::decode::<Value>(&tokens.access, &key, &validation)
        .unwrap()
        .claims;
    for claim in [
        "iss", "sub", "aud", "exp", "iat", "nbf", "jti", "sid", "roles",
    ] {
        assert!(claims.get(claim).is_some(), "missing {claim}");
    }
    assert_eq!(claims["sid"], tokens.session_id.as_str());
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        900
    );
    let again = app.login_ok(&email).await;
    let other: Value = jsonwebtoken::decode(&again.access, &key, &validation)
        .unwrap()
        .claims;
    assert_ne!(claims["jti"], other["jti"], "jti unique per token");
}

#[tokio::test]
async fn unknown_user_wrong_password_and_disabled_user_get_identical_answers() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let disabled = app.new_user().await;
    let mut db = app.db().await;
    sqlx::query("UPDATE users SET disabled = true WHERE email = $1")
        .bind(&disabled)
        .execute(&mut db)
        .await
        .unwrap();

    let mut bodies = Vec::new();
    for (who, password) in [
        ("nobody@example.com", PASSWORD),
        (email.as_str(), "wrong password"),
        (disabled.as_str(), PASSWORD),
    ] {
        let runs_before = app.state.auth.hasher.argon2_runs();
        let res = app.login(who, password).await;
        // Each of them costs exactly one argon2 verification (the unknown user a dummy
        // one), so none can be told apart by time.
        assert_eq!(
            app.state.auth.hasher.argon2_runs(),
            runs_before + 1,
            "{who}"
        );
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let mut headers: Vec<_> = res
            .headers()
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "date" | "x-request-id"))
            .map(|(k, v)| format!("{k}: {v:?}"))
            .collect();
        headers.sort();
        bodies.push((headers, res.bytes().await.unwrap()));
    }
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(bodies[1], bodies[2]);
    let body: Value = serde_json::from_slice(&bodies[0].1).unwrap();
    assert_eq!(body["error"], "invalid_credentials");
}

#[tokio::test]
async fn throttled_logins_get_429_with_retry_after_and_cost_no_hashing() {
    let mut settings = test_settings();
    settings.login.per_account_per_minute = 3;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    for _ in 0..3 {
        assert_eq!(
            app.login(&email, "wrong password").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let hashes_before = app.state.auth.hasher.argon2_runs();
    for attempt in [email.clone(), email.to_uppercase(), format!("  {email} ")] {
        let res = app.login(&attempt, PASSWORD).await;
        let retry_after: u64 = res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    }
    assert_eq!(
        app.state.auth.hasher.argon2_runs(),
        hashes_before,
        "throttled before hashing"
    );
    // Another account from the same IP is not affected.
    let other = app.new_user().await;
    app.login_ok(&other).await;
}

#[tokio::test]
async fn the_account_limit_applies_to_unknown_accounts_alike() {
    let mut settings = test_settings();
    settings.login.per_account_per_minute = 2;
    let app = spawn_app_with(settings).await;
    let known = app.new_user().await;
    for email in [known.as_str(), "ghost@example.com"] {
        for _ in 0..2 {
            assert_eq!(
                app.login(email, "wrong password").await.status(),
                StatusCode::UNAUTHORIZED
            );
        }
        let res = app.login(email, "wrong password").await;
        assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    }
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_does_not_change_the_ip_bucket() {
    let mut settings = test_settings();
    settings.login.per_ip_per_minute = 2;
    let app = spawn_app_with(settings).await;
    let body = json!({"email": "ghost@example.com", "password": "wrong password"});
    for i in 0..2 {
        let res = app
            .client
            .post(app.url("/login"))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    let res = app
        .client
        .post(app.url("/login"))
        .header("x-forwarded-for", "203.0.113.77")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
}

#[tokio::test]
async fn forwarded_for_from_a_trusted_proxy_picks_the_client_bucket() {
    let mut settings = test_settings();
    settings.login.per_ip_per_minute = 1;
    settings.server.trusted_proxies = vec!["127.0.0.1".into()];
    let app = spawn_app_with(settings).await;
    let body = json!({"email": "ghost@example.com", "password": "wrong password"});
    let send = |ip: &'static str| {
        app.client
            .post(app.url("/login"))
            .header("x-forwarded-for", ip)
            .json(&body)
            .send()
    };
    assert_eq!(
        send("198.51.100.1").await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send("198.51.100.1").await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send("198.51.100.2").await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
}

/// Slow hashes (hundreds of ms each), one thread, one waiting slot: a burst that
/// arrives while the first hash runs must overflow.
fn one_slow_hashing_thread() -> tessera::config::Settings {
    let mut settings = test_settings();
    settings.password.memory_kib = 19 * 1024;
    settings.password.iterations = 20;
    settings.password.workers = 1;
    settings.password.queue = 1;
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_hashing_queue_answers_503_with_retry_after_at_once() {
    let app = spawn_app_with(one_slow_hashing_thread()).await;
    let body = json!({"email": "ghost@example.com", "password": "wrong password"});
    let requests = (0..12).map(|_| app.client.post(app.url("/login")).json(&body).send());
    let responses = futures_util::future::join_all(requests).await;
    let (mut refused, mut answered) = (0, 0);
    for res in responses {
        let res = res.unwrap();
        match res.status() {
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_unavailable(res).await;
                refused += 1;
            }
            StatusCode::UNAUTHORIZED => answered += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(refused > 0, "some requests must be refused");
    assert!(answered >= 2, "the pool still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_refused_by_a_full_hashing_queue_do_not_use_up_the_accounts_free_failures() {
    let mut settings = one_slow_hashing_thread();
    settings.login.free_failures = 4;
    settings.login.delay_base_secs = 60;
    settings.login.delay_max_secs = 60;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let body = json!({"email": email, "password": "wrong password"});
    let requests = (0..12).map(|_| app.client.post(app.url("/login")).json(&body).send());
    let responses = futures_util::future::join_all(requests).await;
    let (mut refused, mut answered) = (0, 0);
    for res in responses {
        match res.unwrap().status() {
            StatusCode::SERVICE_UNAVAILABLE => refused += 1,
            StatusCode::UNAUTHORIZED => answered += 1,
            other => panic!("unexpected {other}: a refused login must not count as a failure"),
        }
    }
    assert!(refused > 0, "the burst must overflow the queue");
    assert!(answered < 4, "only the hashed attempts count ({answered})");
    // Twelve attempts arrived, but only the hashed ones were counted: the owner, with
    // the right password, is not made to wait.
    assert_eq!(app.login(&email, PASSWORD).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_session_cap_ends_the_least_recently_used_session() {
    let mut settings = test_settings();
    settings.sessions.max_per_user = 2;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let first = app.login_ok(&email).await;
    let second = app.login_ok(&email).await;
    // Using the first session makes the second the least recently used.
    let first = app.refresh_ok(&first.refresh).await;
    let third = app.login_ok(&email).await;
    assert_invalid_token(app.me(&second.access).await).await;
    assert_invalid_grant(app.refresh(&second.refresh).await, "revoked").await;
    assert_eq!(app.me(&first.access).await.status(), StatusCode::OK);
    assert_eq!(app.me(&third.access).await.status(), StatusCode::OK);
}
