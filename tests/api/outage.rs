use std::net::SocketAddr;

use reqwest::{Method, StatusCode};
use tessera::config::Settings;

use crate::helpers::*;

pub fn addr_of(url: &str) -> SocketAddr {
    let rest = url.split("://").nth(1).unwrap();
    let host_port = rest.rsplit('@').next().unwrap().split('/').next().unwrap();
    use std::net::ToSocketAddrs;
    host_port.to_socket_addrs().unwrap().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_gives_503_and_the_server_recovers() {
    crate::shared_backend_only!();
    let proxy = Proxy::start(addr_of(&postgres_base())).await;
    let mut settings = test_settings();
    let db_name = secrecy::ExposeSecret::expose_secret(&settings.database.url)
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    settings.database.url = format!("postgres://postgres:postgres@{}/{db_name}", proxy.addr).into();
    settings.database.acquire_timeout_ms = 1000;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;

    proxy.cut();
    let res = app.login(&email, PASSWORD).await;
    assert_unavailable(res).await;
    let res = app.refresh(&t.refresh).await;
    assert_unavailable(res).await;
    let ready = app.get("/health/ready").await;
    assert_unavailable(ready).await;
    // /me reads the user from Postgres, so it is unavailable too.
    let me = app.me(&t.access).await;
    assert_unavailable(me).await;
    assert_unavailable(app.register("late@example.com", PASSWORD).await).await;
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", t.refresh.as_str()),
    ];
    assert_unavailable(app.post_form("/token", &form).await).await;
    assert_unavailable(app.post_form("/revoke", &[("token", &t.refresh)]).await).await;

    proxy.restore();
    eventually("login works again", || async {
        app.login(&email, PASSWORD).await.status() == StatusCode::OK
    })
    .await;
    // Nothing was lost: the refresh token that failed during the outage still rotates.
    app.refresh_ok(&t.refresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_gives_503_and_the_server_recovers() {
    crate::shared_backend_only!();
    let (app, proxy) = app_behind_redis_proxy(|s| {
        s.introspection.clients = vec!["api:secret".to_owned().into()];
    })
    .await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    assert_eq!(app.me(&t.access).await.status(), StatusCode::OK);

    proxy.cut();
    // A copy of the marks that was current may answer for the rest of its lease (no
    // revocation can complete meanwhile: each needs Redis); once the copy has noticed
    // the loss, token checks answer 503.
    eventually("token checks notice that Redis is gone", || async {
        app.me(&t.access).await.status() == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let me = app.me(&t.access).await;
    assert_unavailable(me).await;
    // The per-account login budget lives in Redis: without it, no guessing.
    assert_unavailable(app.login(&email, PASSWORD).await).await;
    let res = app.logout(&t.access, None).await;
    assert_unavailable(res).await;
    assert_unavailable(app.post_form("/revoke", &[("token", &t.access)]).await).await;
    let introspect = app
        .client
        .post(app.url("/introspect"))
        .basic_auth("api", Some("secret"))
        .form(&[("token", &t.access)])
        .send()
        .await
        .unwrap();
    assert_unavailable(introspect).await;
    let ready = app.get("/health/ready").await;
    assert_unavailable(ready).await;

    proxy.restore();
    eventually("token checks work again", || async {
        app.me(&t.access).await.status() == StatusCode::OK
    })
    .await;
    assert_eq!(
        app.logout(&t.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_invalid_token(app.me(&t.access).await).await;
}

/// An app whose Redis connection goes through a [`Proxy`] the test controls.
pub async fn app_behind_redis_proxy(configure: impl FnOnce(&mut Settings)) -> (TestApp, Proxy) {
    let proxy = Proxy::start(addr_of(&redis_url())).await;
    let mut settings = test_settings();
    settings.redis.url = format!("redis://{}", proxy.addr).into();
    settings.redis.timeout_ms = 500;
    configure(&mut settings);
    (spawn_app_with(settings).await, proxy)
}

/// After a dropped Redis connection the first request may meet the reconnect: wait
/// until `access` works again (i.e. it is not marked revoked).
async fn until_accepted(app: &TestApp, access: &str) {
    eventually("the token is accepted", || async {
        app.me(access).await.status() == StatusCode::OK
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_logout_retried_after_a_redis_outage_ends_every_access_token() {
    let (app, proxy) = app_behind_redis_proxy(|_| {}).await;
    let email = app.new_user().await;
    let here = app.login_ok(&email).await;
    let there = app.login_ok(&email).await;

    // Redis answers the token check but loses the connection on the denylist write:
    // the database part succeeds, the denylist part does not, the client must retry.
    proxy.drop_connections_sending(b"SETEX");
    assert_unavailable(app.logout(&here.access, Some("global")).await).await;
    proxy.restore();
    until_accepted(&app, &there.access).await;
    assert_eq!(
        app.logout(&here.access, Some("global")).await.status(),
        StatusCode::NO_CONTENT
    );
    // The retry marked the sessions that the first attempt had already ended.
    assert_invalid_token(app.me(&there.access).await).await;
    assert_invalid_token(app.me(&here.access).await).await;
    assert_invalid_grant(app.refresh(&there.refresh).await, "revoked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_detected_while_redis_is_down_is_completed_by_the_next_attempt() {
    let (app, proxy) = app_behind_redis_proxy(|s| s.tokens.refresh_reuse_grace_secs = 0).await;
    let email = app.new_user().await;
    let login = app.login_ok(&email).await;
    let stolen = app.refresh_ok(&login.refresh).await;

    proxy.drop_connections_sending(b"SETEX");
    assert_unavailable(app.refresh(&login.refresh).await).await;
    proxy.restore();
    until_accepted(&app, &stolen.access).await;
    // The first attempt ended the session in the database; the next refresh attempt
    // meets the revoked session and repairs the missing denylist mark.
    assert_invalid_grant(app.refresh(&stolen.refresh).await, "revoked").await;
    assert_invalid_token(app.me(&stolen.access).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_evicted_by_the_cap_while_redis_fails_are_marked_by_the_next_login() {
    let (app, proxy) = app_behind_redis_proxy(|s| s.sessions.max_per_user = 1).await;
    let email = app.new_user().await;
    let first = app.login_ok(&email).await;

    proxy.drop_connections_sending(b"SETEX");
    assert_unavailable(app.login(&email, PASSWORD).await).await;
    proxy.restore();
    // Ended in the database but not yet marked in Redis: the access token still works.
    until_accepted(&app, &first.access).await;
    app.login_ok(&email).await;
    assert_invalid_token(app.me(&first.access).await).await;
    assert_invalid_grant(app.refresh(&first.refresh).await, "revoked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_change_retried_after_a_redis_outage_revokes_the_earlier_tokens() {
    let (app, proxy) = app_behind_redis_proxy(|_| {}).await;
    let admin = app.admin().await;
    let email = app.new_user().await;
    let id = app.user_id(&email).await;
    let before = app.login_ok(&email).await;
    let path = format!("/admin/users/{id}");
    let change = serde_json::json!({"roles": ["editor", "user"]});

    // The roles are stored, then the denylist write fails: 503, the admin retries.
    proxy.drop_connections_sending(b"SETEX");
    assert_unavailable(
        app.call(Method::PATCH, &path, &admin.access, Some(&change))
            .await,
    )
    .await;
    proxy.restore();
    until_accepted(&app, &admin.access).await;
    // The retry changes nothing in the database, but must still write the mark.
    let res = app
        .call(Method::PATCH, &path, &admin.access, Some(&change))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_invalid_token(app.me(&before.access).await).await;
}
