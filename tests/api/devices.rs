//! Known devices (`../shared/api.md` "Known devices"): a stranger failing on purpose
//! keeps a new device in the shared delay, never the owner's known device; and only
//! failures count, so concurrent correct logins are never refused.

use std::time::Duration;

use reqwest::{Response, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

/// The account budget of the attack: 2 free failures, then 1 s, 2 s, 4 s.
fn attacked() -> tessera::config::Settings {
    let mut settings = with_failure_budget(2, 1, 4);
    settings.login.per_account_per_minute = 10;
    settings
}

async fn login_with_device(app: &TestApp, email: &str, password: &str, device: &str) -> Response {
    app.post_json(
        "/login",
        &json!({"email": email, "password": password, "device_token": device}),
    )
    .await
}

/// Logs in and returns the response body's device token.
async fn device_of(app: &TestApp, email: &str) -> String {
    let tokens = app.login_ok(email).await;
    tokens.body["device_token"]
        .as_str()
        .expect("a successful login returns a device token")
        .to_owned()
}

fn retry_after(res: &Response) -> u64 {
    res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn every_login_returns_a_device_token_and_a_known_one_is_handed_back() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let first = device_of(&app, &email).await;
    assert_eq!(first.len(), 43, "256 bits, base64url");
    let second = device_of(&app, &email).await;
    assert_ne!(
        first, second,
        "a login without a device token is a new device"
    );

    let res = login_with_device(&app, &email, PASSWORD, &first).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body["device_token"],
        first.as_str(),
        "the known device keeps its token"
    );

    // Only a hash is stored; refresh responses and session lists carry no device token.
    let mut db = app.db().await;
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT token_hash FROM devices")
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    assert!(
        stored
            .iter()
            .all(|h| h.len() == 32 && h != first.as_bytes())
    );
    let tokens = Tokens::from_body(body);
    let refreshed = app.refresh_ok(&tokens.refresh).await;
    assert!(refreshed.body.get("device_token").is_none());
    let sessions = serde_json::to_string(&app.sessions(&tokens.access).await).unwrap();
    assert!(!sessions.contains(&first));
}

#[tokio::test]
async fn while_an_attacker_keeps_the_account_in_its_delay_the_owners_known_device_always_gets_in() {
    let app = spawn_app_with(attacked()).await;
    let email = app.new_user().await;
    let device = device_of(&app, &email).await;

    // The attacker uses up the free failures ...
    for _ in 0..2 {
        let res = app.login(&email, "wrong password").await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    let mut owner_with_device = 0;
    let mut owner_without_device_refused = 0;
    let mut attacker_through = 0;
    for _ in 0..14 {
        // ... and fails again whenever the delay allows it ...
        let res = app.login(&email, "wrong password").await;
        let attacker_failed_now = match res.status() {
            StatusCode::UNAUTHORIZED => true,
            StatusCode::TOO_MANY_REQUESTS => false,
            other => panic!("attacker got {other}"),
        };
        // ... while the owner's known device gets in every time ...
        let res = login_with_device(&app, &email, PASSWORD, &device).await;
        assert_eq!(
            res.status(),
            StatusCode::OK,
            "the owner's device was refused"
        );
        owner_with_device += 1;
        // ... and the owner's new device (no device token) waits, as before: right after
        // a counted failure the account is at least 1 s into its delay.
        if attacker_failed_now {
            attacker_through += 1;
            let res = app.login(&email, PASSWORD).await;
            assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
            assert!(retry_after(&res) >= 1);
            owner_without_device_refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(owner_with_device, 14);
    assert!(
        attacker_through >= 1,
        "the attacker kept failing past the free ones"
    );
    assert_eq!(owner_without_device_refused, attacker_through);

    // PUT /me/password with the device token is not held in the account's delay either.
    let tokens = Tokens::from_body(
        login_with_device(&app, &email, PASSWORD, &device)
            .await
            .json()
            .await
            .unwrap(),
    );
    app.login(&email, "wrong password").await;
    let body = json!({"current_password": PASSWORD, "new_password": "a brand new password",
                      "device_token": device});
    let res = app
        .call(
            reqwest::Method::PUT,
            "/me/password",
            &tokens.access,
            Some(&body),
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_device_token_counts_only_for_the_account_it_belongs_to() {
    let app = spawn_app_with(attacked()).await;
    let owner = app.new_user().await;
    let other = app.new_user().await;
    let others_device = device_of(&app, &other).await;
    for _ in 0..3 {
        app.login(&owner, "wrong password").await;
    }
    let res = login_with_device(&app, &owner, PASSWORD, &others_device).await;
    assert_eq!(
        res.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "another account's device token is a new device here"
    );
    let res = login_with_device(&app, &owner, PASSWORD, "not-a-device-token").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_device_past_its_own_free_failures_is_a_new_device_until_its_next_success() {
    let mut settings = attacked();
    settings.login.device_free_failures = 3;
    settings.login.delay_max_secs = 1;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let device = device_of(&app, &email).await;
    // The attacker puts the account into its delay.
    for _ in 0..3 {
        app.login(&email, "wrong password").await;
    }
    // Someone holding the device token fails three times: its own budget, no delay.
    let hashes = app.state.auth.hasher.argon2_runs();
    for _ in 0..3 {
        let res = login_with_device(&app, &email, "wrong password", &device).await;
        assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    }
    assert_eq!(app.state.auth.hasher.argon2_runs(), hashes + 3);
    // Then the device is a stranger: the account's delay applies, even to the right
    // password, and nothing is hashed.
    let res = login_with_device(&app, &email, PASSWORD, &device).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(app.state.auth.hasher.argon2_runs(), hashes + 3);
    // Once the delay has passed, a success makes the device known again: with the
    // account back in its delay, the device gets in.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = login_with_device(&app, &email, PASSWORD, &device).await;
    assert_eq!(res.status(), StatusCode::OK);
    for _ in 0..2 {
        app.login(&email, "wrong password").await;
    }
    assert_eq!(
        app.login(&email, PASSWORD).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let res = login_with_device(&app, &email, PASSWORD, &device).await;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "known again after its success"
    );
}

#[tokio::test]
async fn devices_survive_logout_and_password_change() {
    let app = spawn_app_with(attacked()).await;
    let email = app.new_user().await;
    let device = device_of(&app, &email).await;
    let tokens = Tokens::from_body(
        login_with_device(&app, &email, PASSWORD, &device)
            .await
            .json()
            .await
            .unwrap(),
    );
    assert_eq!(
        app.logout(&tokens.access, Some("global")).await.status(),
        StatusCode::NO_CONTENT
    );
    for _ in 0..3 {
        app.login(&email, "wrong password").await;
    }
    let res = login_with_device(&app, &email, PASSWORD, &device).await;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "logout does not forget the device"
    );
}

/// Free failures 5 and a long delay: any counted failure beyond them would show.
fn five_free() -> tessera::config::Settings {
    with_failure_budget(5, 60, 60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_correct_logins_to_one_account_all_succeed() {
    let app = spawn_app_with(five_free()).await;
    let email = app.new_user().await;
    let requests = (0..16).map(|_| app.login(&email, PASSWORD));
    let statuses: Vec<StatusCode> = futures_util::future::join_all(requests)
        .await
        .iter()
        .map(Response::status)
        .collect();
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_looping_correct_logins_are_never_refused() {
    let app = spawn_app_with(five_free()).await;
    let email = app.new_user().await;
    let client = |_| async {
        let mut statuses = Vec::new();
        for _ in 0..6 {
            statuses.push(app.login(&email, PASSWORD).await.status());
        }
        statuses
    };
    let all: Vec<StatusCode> = futures_util::future::join_all((0..16).map(client))
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(all.len(), 96);
    assert!(all.iter().all(|s| *s == StatusCode::OK), "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_concurrent_wrong_passwords_reach_the_hash_at_most_the_free_budget() {
    let app = spawn_app_with(five_free()).await;
    let email = app.new_user().await;
    let hashes = app.state.auth.hasher.argon2_runs();
    let requests = (0..40).map(|_| app.login(&email, "wrong password"));
    let responses = futures_util::future::join_all(requests).await;
    let mut through = 0;
    for res in responses {
        match res.status() {
            StatusCode::UNAUTHORIZED => through += 1,
            StatusCode::TOO_MANY_REQUESTS => assert!(retry_after(&res) >= 1),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(through, 5, "exactly the free failures were checked");
    assert_eq!(app.state.auth.hasher.argon2_runs(), hashes + 5);
    // The failures did count: now even the right password waits.
    let res = app.login(&email, PASSWORD).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn attempts_refused_with_429_are_not_counted_as_failures() {
    let settings = with_failure_budget(2, 1, 60);
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    for _ in 0..2 {
        app.login(&email, "wrong password").await;
    }
    for _ in 0..10 {
        let res = app.login(&email, "wrong password").await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    // Had the ten refusals counted, the delay would be 2^10 s (capped at 60 s), not 1 s.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.login(&email, PASSWORD).await.status(), StatusCode::OK);
}
