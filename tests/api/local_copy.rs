//! Each instance's in-memory copy of the revocation marks (`redis.local_copy`): token
//! checks answered from it see every revocation that completed before they began, on
//! any instance; when the copy cannot be current, checks ask Redis.

use std::time::Duration;

use reqwest::StatusCode;
use tessera::config::Settings;

use crate::helpers::*;
use crate::outage::addr_of;

/// Instance A reaches Redis through a proxy the test controls; B shares its database and
/// reaches Redis directly.
async fn a_behind_proxy_and_b(configure: impl Fn(&mut Settings)) -> (TestApp, Proxy, TestApp) {
    let proxy = Proxy::start(addr_of(&redis_url())).await;
    let mut settings = test_settings();
    settings.redis.timeout_ms = 1000;
    configure(&mut settings);
    let b = spawn_app_with(settings.clone()).await;
    settings.redis.url = format!("redis://{}", proxy.addr).into();
    let a = spawn_app_with(settings).await;
    (a, proxy, b)
}

async fn until_synced(app: &TestApp) {
    let copy = app
        .state
        .auth
        .revocations
        .local_copy()
        .expect("the copy is on");
    assert!(
        copy.wait_synced(Duration::from_secs(10)).await,
        "the copy never loaded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_whose_message_is_still_on_the_way_is_refused_at_once() {
    crate::shared_backend_only!();
    let (a, proxy, b) = a_behind_proxy_and_b(|_| {}).await;
    until_synced(&a).await;
    let email = a.new_user().await;
    let t = a.login_ok(&email).await;
    assert_eq!(a.me(&t.access).await.status(), StatusCode::OK);
    // Everything Redis sends A now arrives 300 ms late, the revocation message too: a
    // check that trusted the copy as it stands would still accept the token.
    proxy.delay_replies(Duration::from_millis(300));
    assert_eq!(
        b.logout(&t.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_invalid_token(a.me(&t.access).await).await;
    proxy.restore();
    assert_invalid_token(a.me(&t.access).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_change_on_one_instance_ends_earlier_tokens_on_the_other_through_the_copy() {
    crate::shared_backend_only!();
    let (a, proxy, b) = a_behind_proxy_and_b(|_| {}).await;
    until_synced(&a).await;
    let admin = b.admin().await;
    let email = a.new_user().await;
    let id = a.user_id(&email).await;
    let before = a.login_ok(&email).await;
    assert_eq!(a.me(&before.access).await.status(), StatusCode::OK);
    // A may not ask Redis per check: it must know from its copy.
    proxy.drop_connections_sending(b"MGET");
    let res = b
        .call(
            reqwest::Method::PATCH,
            &format!("/admin/users/{id}"),
            &admin.access,
            Some(&serde_json::json!({"roles": ["editor", "user"]})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_invalid_token(a.me(&before.access).await).await;
    // Tokens issued after the change are unaffected.
    let after = a.login_ok(&email).await;
    assert_eq!(a.me(&after.access).await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_copy_token_checks_send_redis_no_command_of_their_own() {
    crate::shared_backend_only!();
    let (a, proxy, b) = a_behind_proxy_and_b(|_| {}).await;
    until_synced(&a).await;
    let email = a.new_user().await;
    let kept = a.login_ok(&email).await;
    let ended = a.login_ok(&email).await;
    // Any connection that sends MGET (the per-check query) is dropped from here on.
    proxy.drop_connections_sending(b"MGET");
    for _ in 0..20 {
        assert_eq!(a.me(&kept.access).await.status(), StatusCode::OK);
    }
    assert_eq!(
        b.logout(&ended.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_invalid_token(a.me(&ended.access).await).await;
    assert_eq!(a.me(&kept.access).await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_copy_every_check_asks_redis() {
    crate::shared_backend_only!();
    // The same setting as above with the copy off: the dropped MGET fails the check.
    let (a, proxy, _b) = a_behind_proxy_and_b(|s| s.redis.local_copy = false).await;
    assert!(a.state.auth.revocations.local_copy().is_none());
    let email = a.new_user().await;
    let t = a.login_ok(&email).await;
    assert_eq!(a.me(&t.access).await.status(), StatusCode::OK);
    proxy.drop_connections_sending(b"MGET");
    assert_unavailable(a.me(&t.access).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_cannot_subscribe_asks_redis_instead() {
    crate::shared_backend_only!();
    let proxy = Proxy::start(addr_of(&redis_url())).await;
    // Every subscription attempt is dropped: the copy never loads.
    proxy.drop_connections_sending(b"SUBSCRIBE");
    let settings = test_settings();
    let b = spawn_app_with(settings.clone()).await;
    let mut via_proxy = settings;
    via_proxy.redis.url = format!("redis://{}", proxy.addr).into();
    let a = spawn_app_with(via_proxy).await;
    let copy = a
        .state
        .auth
        .revocations
        .local_copy()
        .expect("the copy is on");
    assert!(!copy.wait_synced(Duration::from_millis(500)).await);

    let email = a.new_user().await;
    let t = a.login_ok(&email).await;
    assert_eq!(a.me(&t.access).await.status(), StatusCode::OK);
    assert_eq!(
        b.logout(&t.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_invalid_token(a.me(&t.access).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_made_while_an_instance_was_cut_off_reach_its_copy_on_resync() {
    crate::shared_backend_only!();
    let (a, proxy, b) = a_behind_proxy_and_b(|_| {}).await;
    until_synced(&a).await;
    let email = a.new_user().await;
    let t = a.login_ok(&email).await;
    assert_eq!(a.me(&t.access).await.status(), StatusCode::OK);

    // A loses Redis; B revokes meanwhile: A's subscription never hears the message.
    proxy.cut();
    assert_eq!(
        b.logout(&t.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_unavailable(a.me(&t.access).await).await;
    proxy.restore();
    until_synced(&a).await;
    // Only the full resync can know: answered from the copy (MGET is refused now).
    proxy.drop_connections_sending(b"MGET");
    assert_invalid_token(a.me(&t.access).await).await;
}

async fn until_current(app: &TestApp) {
    let copy = app
        .state
        .auth
        .revocations
        .local_copy()
        .expect("the copy is on");
    eventually("the copy is current", || async { copy.current() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_current_copy_answers_without_redis_and_only_for_its_lease() {
    crate::shared_backend_only!();
    let (a, proxy, _b) = a_behind_proxy_and_b(|s| s.redis.local_copy_lease_ms = 3000).await;
    until_synced(&a).await;
    let email = a.new_user().await;
    let t = a.login_ok(&email).await;
    until_current(&a).await;
    // Redis goes silent for A: a check that needed any answer from it would fail.
    proxy.freeze();
    assert_eq!(a.me(&t.access).await.status(), StatusCode::OK);
    // Past the lease the copy is no longer trusted.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_unavailable(a.me(&t.access).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_waits_out_an_instance_that_cannot_acknowledge_it() {
    crate::shared_backend_only!();
    let (a, proxy, b) = a_behind_proxy_and_b(|s| s.redis.local_copy_lease_ms = 2000).await;
    until_synced(&a).await;
    let email = a.new_user().await;
    let t = a.login_ok(&email).await;
    until_current(&a).await;
    // A is cut off silently: it neither hears the revocation nor acknowledges it, and
    // its copy is current for up to 2 s after its last answered ping.
    proxy.freeze();
    assert_eq!(
        b.logout(&t.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    // B answered only once A's lease had run out: A no longer trusts its copy, which
    // does not have the revocation, and cannot ask Redis.
    let res = a.me(&t.access).await;
    assert_ne!(res.status(), StatusCode::OK, "a revoked token was accepted");
    assert_unavailable(res).await;
}
