use reqwest::StatusCode;

use crate::helpers::*;

async fn two_instances() -> (TestApp, TestApp) {
    let settings = test_settings();
    let a = spawn_app_with(settings.clone()).await;
    let b = spawn_app_with(settings).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_on_one_instance_is_refused_on_the_other_at_once() {
    crate::shared_backend_only!();
    let (a, b) = two_instances().await;
    let email = a.new_user().await;
    let t = a.login_ok(&email).await;
    // A has checked (and remembered) the token before B logs it out.
    assert_eq!(a.me(&t.access).await.status(), StatusCode::OK);
    assert_eq!(a.me(&t.access).await.status(), StatusCode::OK);
    assert_eq!(
        b.logout(&t.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_invalid_token(a.me(&t.access).await).await;
    assert_invalid_grant(a.refresh(&t.refresh).await, "revoked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_a_new_kid_makes_another_instance_reload_at_once() {
    crate::shared_backend_only!();
    // A rereads the key directory every second, B only every hour: B must reload when
    // it meets a token signed with a key it does not know yet.
    let mut fast = test_settings();
    fast.keys.reload_secs = 1;
    let mut slow = fast.clone();
    slow.keys.reload_secs = 3600;
    let a = spawn_app_with(fast).await;
    let b = spawn_app_with(slow).await;
    let email = a.new_user().await;
    let before = a.login_ok(&email).await;
    assert_eq!(b.me(&before.access).await.status(), StatusCode::OK);
    crate::keys::tessera(&a, &["keys", "rotate", "--now"]);
    let mut after = a.login_ok(&email).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while crate::keys::kid_of(&after.access) == crate::keys::kid_of(&before.access) {
        assert!(
            std::time::Instant::now() < deadline,
            "A never signed with the new key"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        after = a.login_ok(&email).await;
    }
    assert_eq!(
        b.me(&after.access).await.status(),
        StatusCode::OK,
        "B reloaded on the unknown kid"
    );
    assert_eq!(b.jwks().await["keys"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_across_instances_never_fork() {
    crate::shared_backend_only!();
    let (a, b) = two_instances().await;
    let email = a.new_user().await;
    let mut current = a.login_ok(&email).await;
    for _round in 0..3 {
        let requests = (0..8).map(|i| {
            if i % 2 == 0 {
                a.refresh(&current.refresh)
            } else {
                b.refresh(&current.refresh)
            }
        });
        let responses = futures_util::future::join_all(requests).await;
        current = assert_one_successor(responses).await.remove(0);
    }
    let mut db = a.db().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM refresh_tokens")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(rows, 4, "one token per rotation, no forks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_detected_on_one_instance_kills_access_tokens_on_the_other() {
    crate::shared_backend_only!();
    let mut settings = test_settings();
    settings.tokens.refresh_reuse_grace_secs = 0;
    let a = spawn_app_with(settings.clone()).await;
    let b = spawn_app_with(settings).await;
    let email = a.new_user().await;
    let login = a.login_ok(&email).await;
    let next = b.refresh_ok(&login.refresh).await;
    assert_invalid_grant(a.refresh(&login.refresh).await, "reused").await;
    assert_invalid_token(b.me(&next.access).await).await;
}
