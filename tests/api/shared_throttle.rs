use std::time::Duration;

use reqwest::{Response, StatusCode};

use crate::helpers::*;

fn retry_after(res: &Response) -> u64 {
    res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// `attempts` wrong-password logins on `email`, all at once, spread over `apps`;
/// returns how many were let through to the password check (401, not 429).
async fn let_through(apps: &[&TestApp], email: &str, attempts: usize) -> usize {
    let requests = (0..attempts).map(|i| apps[i % apps.len()].login(email, "wrong password"));
    let responses = futures_util::future::join_all(requests).await;
    let mut through = 0;
    for res in responses {
        match res.status() {
            StatusCode::UNAUTHORIZED => through += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(retry_after(&res) >= 1);
                assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
            }
            other => panic!("unexpected {other}"),
        }
    }
    through
}

fn strict() -> tessera::config::Settings {
    with_failure_budget(3, 60, 60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_redis_together_allow_no_more_per_account_attempts_than_one() {
    crate::shared_backend_only!();
    let single = spawn_app_with(strict()).await;
    let settings = strict();
    let a = spawn_app_with(settings.clone()).await;
    let b = spawn_app_with(settings).await;
    let alone = single.new_user().await;
    let shared = a.new_user().await;

    let one = let_through(&[&single], &alone, 12).await;
    let two = let_through(&[&a, &b], &shared, 12).await;
    assert_eq!(one, 3, "one instance lets the free attempts through");
    assert_eq!(two, one, "two instances let through no more than one");
    // Unknown accounts are counted the same way (a 429 reveals nothing).
    assert_eq!(let_through(&[&a, &b], "ghost@example.com", 12).await, 3);
    // And the correct password must wait too.
    let res = b.login(&shared, PASSWORD).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn delays_grow_are_bounded_and_a_success_resets_the_count() {
    crate::shared_backend_only!();
    let settings = with_failure_budget(2, 1, 4);
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    assert_eq!(let_through(&[&app], &email, 2).await, 2);

    // Past the free attempts: 1 s, 2 s, 4 s (doubling: linear growth would give 3 s),
    // then capped at 4 s.
    for expected_wait in [1, 2, 4, 4] {
        let hashes = app.state.auth.hasher.argon2_runs();
        let res = app.login(&email, "wrong password").await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(retry_after(&res), expected_wait);
        assert_eq!(app.state.auth.hasher.argon2_runs(), hashes, "no hashing");
        tokio::time::sleep(Duration::from_millis(expected_wait * 1000 + 50)).await;
        assert_eq!(
            app.login(&email, "wrong password").await.status(),
            StatusCode::UNAUTHORIZED,
            "after the wait an attempt goes through: no lockout"
        );
    }
    tokio::time::sleep(Duration::from_millis(4050)).await;
    app.login_ok(&email).await;
    // The success reset the count: the free attempts are back.
    assert_eq!(let_through(&[&app], &email, 3).await, 2);
}
