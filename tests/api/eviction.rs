//! A Redis that may evict (any `maxmemory-policy` but `noeviction`) could drop
//! revocation marks and bring revoked tokens back: readiness says so, and so does the
//! start log. Against a Redis the test starts on its own port.

use reqwest::StatusCode;

use crate::helpers::*;

#[tokio::test]
async fn readiness_is_503_while_redis_may_evict_and_200_with_noeviction() {
    let evicting = OwnRedis::start(&["--maxmemory-policy", "allkeys-lru"]).await;
    let mut settings = test_settings();
    settings.redis.url = evicting.url.clone().into();
    let app = spawn_app_with(settings).await;
    let res = app.get("/health/ready").await;
    assert!(res.headers().contains_key("retry-after"));
    let body = assert_error(
        res,
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
    )
    .await;
    assert!(
        body["redis"].as_str().unwrap().contains("allkeys-lru"),
        "{body}"
    );
    assert_eq!(app.get("/health/live").await.status(), StatusCode::OK);

    let safe = OwnRedis::start(&["--maxmemory-policy", "noeviction"]).await;
    let mut settings = test_settings();
    settings.redis.url = safe.url.clone().into();
    let app = spawn_app_with(settings).await;
    assert_eq!(app.get("/health/ready").await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_log_warns_when_redis_may_evict() {
    let evicting = OwnRedis::start(&["--maxmemory-policy", "volatile-ttl"]).await;
    let (mut cmd, log_path) = server_binary(&test_settings());
    let mut child = cmd
        .env("TESSERA__REDIS__URL", &evicting.url)
        .spawn()
        .unwrap();
    let mut warning = None;
    eventually("the start log warns about the eviction policy", || {
        warning = json_log(&log_path).into_iter().find(|l| {
            l["level"] == "WARN"
                && l["why"]
                    .as_str()
                    .is_some_and(|w| w.contains("maxmemory-policy is volatile-ttl"))
        });
        std::future::ready(warning.is_some())
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&log_path);
    let message = warning.unwrap()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("noeviction"), "{message}");
}

#[tokio::test]
async fn a_redis_that_keeps_info_to_itself_is_still_ready() {
    // Managed services rename commands; an answer of any kind means Redis is up.
    let quiet = OwnRedis::start(&["--rename-command", "INFO", ""]).await;
    let mut settings = test_settings();
    settings.redis.url = quiet.url.clone().into();
    let app = spawn_app_with(settings).await;
    assert_eq!(app.get("/health/ready").await.status(), StatusCode::OK);
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    assert_eq!(app.me(&t.access).await.status(), StatusCode::OK);
}
