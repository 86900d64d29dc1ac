//! A Redis that may evict (any `maxmemory-policy` but `noeviction`) could drop
//! revocation marks and bring revoked tokens back: readiness says so, and so does the
//! start log. Against a Redis the test starts on its own port.

use std::process::{Command, Stdio};

use reqwest::StatusCode;
use serde_json::Value;

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
    use secrecy::ExposeSecret;
    let evicting = OwnRedis::start(&["--maxmemory-policy", "volatile-ttl"]).await;
    let settings = test_settings();
    let log_path = std::env::temp_dir().join(format!("tessera-log-{}.json", uuid::Uuid::new_v4()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .env_remove("RUST_LOG")
        .env("TESSERA__SERVER__PORT", "0")
        .env(
            "TESSERA__DATABASE__URL",
            settings.database.url.expose_secret(),
        )
        .env("TESSERA__REDIS__URL", &evicting.url)
        .env("TESSERA__KEYS__DIR", &settings.keys.dir)
        .env("TESSERA__LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()))
        .spawn()
        .unwrap();
    let mut warning = None;
    eventually("the start log warns about the eviction policy", || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        warning = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["level"] == "WARN" && l["policy"] == "volatile-ttl");
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
