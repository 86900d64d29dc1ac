//! tessera-verify against the real server: the example downstream API, revocation
//! through pub/sub, key rotation, forgeries and fetch-storm protection.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tessera_verify::{Config, RevocationConfig, Verifier, VerifyError};

use crate::helpers::*;
use crate::keys::{kid_of, tessera};
use crate::outage::addr_of;

#[allow(dead_code)] // its main() is for `cargo run --example`
#[path = "../../tessera-verify/examples/downstream_api.rs"]
mod example;

/// The documented bound on how long after a logout an API may still accept the token.
const REVOCATION_BOUND: Duration = Duration::from_secs(1);

/// A verifier for `app`'s tokens, fetching keys from its JWKS, with revocation.
fn config_for(app: &TestApp) -> Config {
    let mut config = Config::new(&app.settings.tokens.issuer, &app.settings.tokens.audience);
    config.jwks_url = Some(app.url("/.well-known/jwks.json"));
    config.refetch_interval = Duration::from_millis(500);
    config.revocation = Some(RevocationConfig::new(
        redis_url(),
        &app.settings.redis.key_prefix,
    ));
    config
}

async fn ready_verifier(config: Config) -> Verifier {
    let verifier = Verifier::new(config).unwrap();
    assert!(
        verifier.ready(Duration::from_secs(10)).await,
        "revocation set loaded"
    );
    verifier
}

/// The example API on port 0; returns its base URL.
fn spawn_example(verifier: Verifier) -> String {
    let routes = example::configure(verifier);
    let server =
        actix_web::HttpServer::new(move || actix_web::App::new().configure(routes.clone()))
            .workers(1)
            .bind("127.0.0.1:0")
            .unwrap();
    let base = format!("http://{}", server.addrs()[0]);
    tokio::spawn(server.run());
    base
}

async fn hello(app: &TestApp, api: &str, token: &str) -> reqwest::Response {
    app.client
        .get(format!("{api}/hello"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_api_accepts_a_fresh_token_and_refuses_it_soon_after_logout() {
    crate::shared_backend_only!();
    // Discovery through the issuer's metadata needs the issuer to be the real address.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut settings = test_settings();
    settings.server.port = port;
    settings.tokens.issuer = format!("http://127.0.0.1:{port}");
    let app = spawn_app_with(settings).await;
    let mut config = config_for(&app);
    config.jwks_url = None;
    let verifier = ready_verifier(config).await;
    let api = spawn_example(verifier.clone());

    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let res = hello(&app, &api, &t.access).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["hello"], app.user_id(&email).await.to_string());
    assert_eq!(body["roles"], json!(["user"]));
    assert_eq!(verifier.jwks_fetches(), 2, "metadata, then the JWKS");

    assert_eq!(
        app.logout(&t.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    let logged_out = Instant::now();
    loop {
        let res = hello(&app, &api, &t.access).await;
        if res.status() == StatusCode::UNAUTHORIZED {
            assert_eq!(
                res.headers()["www-authenticate"],
                r#"Bearer error="invalid_token""#
            );
            break;
        }
        assert!(
            logged_out.elapsed() < REVOCATION_BOUND,
            "still accepted {:?} after logout",
            logged_out.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    println!(
        "API refused the token {:?} after logout",
        logged_out.elapsed()
    );
    let res = app.client.get(format!("{api}/hello")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_revocation_reaches_the_verifier_and_a_resync_catches_up() {
    crate::shared_backend_only!();
    let app = spawn_app().await;
    let admin = app.admin().await;
    let verifier = ready_verifier(config_for(&app)).await;
    let email = app.new_user().await;
    let id = app.user_id(&email).await;
    let eventually_revoked = |token: String| {
        let verifier = verifier.clone();
        async move {
            eventually("the verifier refuses the token", || async {
                verifier.verify(&token).await == Err(VerifyError::Revoked)
            })
            .await;
        }
    };

    let session = app.login_ok(&email).await;
    let single = app.login_ok(&email).await;
    let other = app.login_ok(&email).await;
    for t in [&session, &single, &other] {
        assert!(verifier.verify(&t.access).await.is_ok());
    }
    app.post_form("/revoke", &[("token", &single.access)]).await; // jti mark
    eventually_revoked(single.access.clone()).await;
    app.logout(&session.access, None).await; // sid mark
    eventually_revoked(session.access.clone()).await;
    let patch = json!({"roles": ["user", "editor"]});
    let res = app
        .call(
            reqwest::Method::PATCH,
            &format!("/admin/users/{id}"),
            &admin.access,
            Some(&patch),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK); // user mark
    eventually_revoked(other.access.clone()).await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    let renewed = app.refresh_ok(&other.refresh).await;
    assert_eq!(
        verifier.verify(&renewed.access).await.unwrap().roles,
        ["editor", "user"]
    );

    // A verifier started later loads the same state from Redis in full.
    let late = ready_verifier(config_for(&app)).await;
    for token in [&session.access, &single.access, &other.access] {
        assert_eq!(late.verify(token).await, Err(VerifyError::Revoked));
    }
    assert!(late.verify(&renewed.access).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_fails_closed_after_the_bound_and_the_resync_catches_what_was_missed() {
    crate::shared_backend_only!();
    let app = spawn_app().await;
    let proxy = Proxy::start(addr_of(&redis_url())).await;
    let mut closed = config_for(&app);
    let mut open = config_for(&app);
    for (config, fail_open) in [(&mut closed, false), (&mut open, true)] {
        let rc = config.revocation.as_mut().unwrap();
        rc.redis_url = format!("redis://{}", proxy.addr);
        rc.max_unsynced = Duration::from_millis(300);
        rc.fail_open = fail_open;
    }
    let closed = ready_verifier(closed).await;
    let open = ready_verifier(open).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let missed = app.login_ok(&email).await;

    proxy.cut();
    // Revoked while the verifiers cannot hear it.
    app.logout(&missed.access, None).await;
    eventually("fail-closed refuses once out of touch too long", || async {
        closed.verify(&t.access).await == Err(VerifyError::RevocationUnavailable)
    })
    .await;
    assert!(open.verify(&t.access).await.is_ok(), "fail-open accepts");

    proxy.restore();
    eventually("both resync", || async {
        closed.verify(&t.access).await.is_ok()
    })
    .await;
    assert!(open.ready(Duration::from_secs(10)).await);
    for verifier in [&closed, &open] {
        assert_eq!(
            verifier.verify(&missed.access).await,
            Err(VerifyError::Revoked)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_silently_dropped_by_the_network_is_noticed_within_max_unsynced() {
    crate::shared_backend_only!();
    let app = spawn_app().await;
    let proxy = Proxy::start(addr_of(&redis_url())).await;
    let mut config = config_for(&app);
    let rc = config.revocation.as_mut().unwrap();
    rc.redis_url = format!("redis://{}", proxy.addr);
    rc.max_unsynced = Duration::from_millis(800);
    let verifier = ready_verifier(config).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let missed = app.login_ok(&email).await;
    assert!(verifier.verify(&missed.access).await.is_ok());

    // The connection stays open but nothing gets through, either way.
    proxy.freeze();
    let frozen_at = Instant::now();
    app.logout(&missed.access, None).await;
    eventually(
        "the verifier notices the silence and fails closed",
        || async { verifier.verify(&t.access).await == Err(VerifyError::RevocationUnavailable) },
    )
    .await;
    let noticed = frozen_at.elapsed();
    assert!(
        noticed < Duration::from_millis(800 + 600),
        "noticed after {noticed:?}"
    );
    // Back: it reconnects, resyncs, and knows the revocation it could not hear.
    proxy.restore();
    assert!(verifier.ready(Duration::from_secs(10)).await);
    assert_eq!(
        verifier.verify(&missed.access).await,
        Err(VerifyError::Revoked)
    );
    assert!(verifier.verify(&t.access).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_key_rotation_new_tokens_verify_without_a_restart() {
    crate::shared_backend_only!();
    let mut settings = test_settings();
    settings.keys.reload_secs = 1;
    let app = spawn_app_with(settings).await;
    let mut config = config_for(&app);
    config.revocation = None;
    let verifier = Verifier::new(config).unwrap();
    let email = app.new_user().await;
    let before = app.login_ok(&email).await;
    assert!(verifier.verify(&before.access).await.is_ok());

    tessera(&app, &["keys", "rotate", "--now"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let fresh = app.login_ok(&email).await;
        if kid_of(&fresh.access) != kid_of(&before.access) {
            break fresh;
        }
        assert!(
            Instant::now() < deadline,
            "the server never signed with the new key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await; // one refetch interval
    assert!(
        verifier.verify(&after.access).await.is_ok(),
        "new key fetched"
    );
    assert!(
        verifier.verify(&before.access).await.is_ok(),
        "old key kept"
    );
}

fn forge(header: Value, payload: &str, signature: &str) -> String {
    format!(
        "{}.{payload}.{signature}",
        URL_SAFE_NO_PAD.encode(header.to_string())
    )
}

#[tokio::test]
async fn forged_tokens_are_refused_with_the_right_error_kind() {
    crate::shared_backend_only!();
    let mut settings = test_settings();
    settings.tokens.access_ttl_secs = 1;
    settings.tokens.leeway_secs = 0;
    let app = spawn_app_with(settings).await;
    let mut config = config_for(&app);
    config.revocation = None;
    config.leeway = Duration::ZERO;
    let verifier = Verifier::new(config.clone()).unwrap();
    let t = app.login_ok(&app.new_user().await).await;
    assert!(verifier.verify(&t.access).await.is_ok());

    let parts: Vec<&str> = t.access.split('.').collect();
    let kid = kid_of(&t.access);
    let jwks = app.jwks().await;
    let public_key = jwks["keys"][0].to_string();
    let hs256 = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(kid.clone());
        header.typ = Some("at+jwt".into());
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        let key = jsonwebtoken::EncodingKey::from_secret(public_key.as_bytes());
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let tampered_payload = {
        let mut claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["roles"] = json!(["admin"]);
        URL_SAFE_NO_PAD.encode(claims.to_string())
    };
    let cases = [
        (
            forge(
                json!({"alg": "none", "kid": kid, "typ": "at+jwt"}),
                parts[1],
                "",
            ),
            VerifyError::WrongAlgorithm,
        ),
        (hs256, VerifyError::WrongAlgorithm),
        (
            forge(
                json!({"alg": "ES256", "kid": kid, "typ": "JWT"}),
                parts[1],
                parts[2],
            ),
            VerifyError::WrongType,
        ),
        (
            format!("{}.{tampered_payload}.{}", parts[0], parts[2]),
            VerifyError::BadSignature,
        ),
        (
            forge(
                json!({"alg": "ES256", "kid": "nope", "typ": "at+jwt"}),
                parts[1],
                parts[2],
            ),
            VerifyError::UnknownKey,
        ),
        ("not a token".to_owned(), VerifyError::Malformed),
    ];
    for (token, kind) in &cases {
        assert_eq!(
            verifier.verify(token).await.as_ref().err(),
            Some(kind),
            "{token}"
        );
    }
    let mut other_audience = config.clone();
    other_audience.audience = "another-api".into();
    let other = Verifier::new(other_audience).unwrap();
    assert_eq!(
        other.verify(&t.access).await,
        Err(VerifyError::WrongAudience)
    );
    let mut other_issuer = config;
    other_issuer.issuer = "https://elsewhere.example".into();
    let other = Verifier::new(other_issuer).unwrap();
    assert_eq!(other.verify(&t.access).await, Err(VerifyError::WrongIssuer));

    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(verifier.verify(&t.access).await, Err(VerifyError::Expired));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_random_kids_causes_at_most_one_jwks_fetch_per_interval() {
    crate::shared_backend_only!();
    let app = spawn_app().await;
    let mut config = config_for(&app);
    config.revocation = None;
    config.refetch_interval = Duration::from_secs(2);
    let verifier = Verifier::new(config).unwrap();
    let t = app.login_ok(&app.new_user().await).await;
    assert!(verifier.verify(&t.access).await.is_ok());
    assert_eq!(verifier.jwks_fetches(), 1);
    let parts: Vec<&str> = t.access.split('.').collect();

    let started = Instant::now();
    let flood = (0..500).map(|_| {
        let header =
            json!({"alg": "ES256", "kid": uuid::Uuid::new_v4().to_string(), "typ": "at+jwt"});
        let token = forge(header, parts[1], parts[2]);
        let verifier = verifier.clone();
        async move { verifier.verify(&token).await }
    });
    let results = futures_util::future::join_all(flood).await;
    assert!(results.iter().all(|r| *r == Err(VerifyError::UnknownKey)));
    let elapsed = started.elapsed();
    let allowed = 1 + (elapsed.as_secs_f64() / 2.0).floor() as u64;
    assert!(
        verifier.jwks_fetches() - 1 <= allowed,
        "{} fetches in {elapsed:?}",
        verifier.jwks_fetches() - 1
    );
    // The real key still verifies without another fetch.
    let before = verifier.jwks_fetches();
    assert!(verifier.verify(&t.access).await.is_ok());
    assert_eq!(verifier.jwks_fetches(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_cached_per_cache_control_and_served_stale_while_the_issuer_is_down() {
    crate::shared_backend_only!();
    let mut settings = test_settings();
    settings.keys.jwks_max_age_secs = 1;
    let app = spawn_app_with(settings).await;
    let proxy = Proxy::start(addr_of(&app.base)).await;
    let mut config = config_for(&app);
    config.revocation = None;
    config.refetch_interval = Duration::from_millis(100);
    config.jwks_url = Some(format!("http://{}/.well-known/jwks.json", proxy.addr));
    let verifier = Verifier::new(config).unwrap();
    let t = app.login_ok(&app.new_user().await).await;

    assert!(verifier.verify(&t.access).await.is_ok());
    assert!(verifier.verify(&t.access).await.is_ok());
    assert_eq!(verifier.jwks_fetches(), 1, "cached within max-age=1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(verifier.verify(&t.access).await.is_ok());
    assert_eq!(verifier.jwks_fetches(), 2, "refetched once max-age passed");

    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        verifier.verify(&t.access).await.is_ok(),
        "stale keys still serve"
    );
    assert_eq!(verifier.jwks_fetches(), 3, "a refetch was tried and failed");
    proxy.restore();
}

/// Tokens signed with the server's real key but with chosen claims, so that only the
/// verifier's claim checks decide.
fn resign(app: &TestApp, real: &str, edit: impl FnOnce(&mut Value)) -> String {
    let payload = real.split('.').nth(1).unwrap();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    edit(&mut claims);
    let ring = app.state.auth.tokens.keyring().current();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(kid_of(real));
    h.typ = Some("at+jwt".into());
    jsonwebtoken::encode(&h, &claims, &ring.signing.encoding).unwrap()
}

#[tokio::test]
async fn the_verifier_applies_nbf_and_exp_with_its_leeway_and_needs_every_claim() {
    crate::shared_backend_only!();
    let app = spawn_app().await;
    let mut config = config_for(&app);
    config.revocation = None;
    config.leeway = Duration::from_secs(30);
    let verifier = Verifier::new(config).unwrap();
    let email = app.new_user().await;
    let real = app.login_ok(&email).await.access;
    let now = chrono::Utc::now().timestamp();
    assert!(
        verifier.verify(&resign(&app, &real, |_| {})).await.is_ok(),
        "control"
    );
    for (field, value, expected) in [
        ("nbf", now + 10, Ok(())),
        ("nbf", now + 120, Err(VerifyError::NotYetValid)),
        ("exp", now - 10, Ok(())),
        ("exp", now - 120, Err(VerifyError::Expired)),
    ] {
        let token = resign(&app, &real, |c| c[field] = json!(value));
        let got = verifier.verify(&token).await.map(|_| ());
        assert_eq!(got, expected, "{field} = now {:+}", value - now);
    }
    for claim in [
        "sub", "sid", "jti", "exp", "iat", "nbf", "roles", "iss", "aud",
    ] {
        let token = resign(&app, &real, |c| {
            c.as_object_mut().unwrap().remove(claim);
        });
        let result = verifier.verify(&token).await;
        assert!(result.is_err(), "without {claim}: accepted");
        if !["iss", "aud", "exp", "nbf"].contains(&claim) {
            assert_eq!(
                result.unwrap_err(),
                VerifyError::MissingClaim,
                "without {claim}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_api_answers_503_while_revocations_cannot_be_known() {
    crate::shared_backend_only!();
    let app = spawn_app().await;
    let mut config = config_for(&app);
    let rc = config.revocation.as_mut().unwrap();
    // Nothing listens there: the set is never loaded, and fail-closed refuses.
    rc.redis_url = format!("redis://127.0.0.1:{}", {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    });
    let verifier = Verifier::new(config).unwrap();
    let api = spawn_example(verifier);
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let res = hello(&app, &api, &t.access).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "temporarily_unavailable", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_needs_a_second_factor_steps_up_like_tessera() {
    let app = spawn_app().await;
    // Signature and claims only, so this runs on the embedded backend too.
    let mut config = config_for(&app);
    config.revocation = None;
    let api = spawn_example(Verifier::new(config).unwrap());
    let payouts = |token: String| {
        let req = app.client.get(format!("{api}/payouts")).bearer_auth(token);
        async move { req.send().await.unwrap() }
    };
    let (_, secret, _, tokens) = crate::mfa::with_totp(&app).await;
    let res = payouts(tokens.access.clone()).await;
    assert_eq!(
        res.headers()["www-authenticate"],
        r#"Bearer error="insufficient_user_authentication", acr_values="mfa""#
    );
    assert_error(
        res,
        StatusCode::UNAUTHORIZED,
        "insufficient_user_authentication",
    )
    .await;
    let code = crate::mfa::totp(&secret, crate::mfa::fresh_step());
    let res = app
        .call(
            reqwest::Method::POST,
            "/me/reauthenticate",
            &tokens.access,
            Some(&json!({"password": PASSWORD, "code": code})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let stepped_up = Tokens::from_body(res.json().await.unwrap());
    let res = payouts(stepped_up.access).await;
    assert_eq!(res.status(), StatusCode::OK);
}
