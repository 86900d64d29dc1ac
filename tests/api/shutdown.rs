//! Graceful shutdown of the real binary: SIGTERM during a steady stream of refreshes.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tessera::startup::Application;

use crate::helpers::*;

const CHAINS: usize = 4;

/// The server process, killed if the test fails before it exits.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One chain of refreshes, each on a new connection, until the server stops taking
/// them. An answer must be 200; a request that gets none (refused, or reset from the
/// listen backlog when the listener closes) ends the chain. Returns the chain's last
/// token and the times its refreshes were answered. Whether a request that got no
/// answer was nonetheless processed is decided at the end: with no reuse grace window,
/// a token rotated without its answer would count as reuse on the second instance.
async fn refresh_until_refused(base: String, mut token: String) -> (String, Vec<Instant>) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut answered = Vec::new();
    loop {
        let res = client
            .post(format!("{base}/refresh"))
            .json(&json!({ "refresh_token": token }))
            .send()
            .await;
        match res {
            Ok(res) => {
                assert_eq!(res.status(), StatusCode::OK, "an accepted refresh failed");
                token = Tokens::from_body(res.json().await.unwrap()).refresh;
                answered.push(Instant::now());
            }
            Err(_) => return (token, answered),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_without_failing_an_accepted_request_or_losing_a_rotation() {
    let mut settings = test_settings();
    settings.tokens.refresh_reuse_grace_secs = 0;
    let (mut cmd, log_path) = server_binary(&settings);
    let mut child = Running(
        cmd.env("TESSERA__PASSWORD__MEMORY_KIB", "256")
            .env("TESSERA__PASSWORD__ITERATIONS", "1")
            .env("TESSERA__PASSWORD__ALLOW_WEAK", "true")
            .env("TESSERA__SERVER__SHUTDOWN_DELAY_SECS", "2")
            .env("TESSERA__SERVER__SHUTDOWN_TIMEOUT_SECS", "10")
            .env("TESSERA__TOKENS__REFRESH_REUSE_GRACE_SECS", "0")
            .spawn()
            .unwrap(),
    );
    let base = listening_at(&log_path).await;
    let client = reqwest::Client::new();
    let ready = || client.get(format!("{base}/health/ready")).send();
    assert_eq!(ready().await.unwrap().status(), StatusCode::OK);

    let mut chains = Vec::new();
    for i in 0..CHAINS {
        let email = format!("drain-{i}@example.com");
        let body = json!({"email": email, "password": PASSWORD});
        let res = client
            .post(format!("{base}/users"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        let res = client
            .post(format!("{base}/login"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let token = Tokens::from_body(res.json().await.unwrap()).refresh;
        chains.push(tokio::spawn(refresh_until_refused(base.clone(), token)));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let signalled = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Readiness turns first; requests are still served after it has.
    eventually("readiness answers 503", || async {
        ready()
            .await
            .is_ok_and(|r| r.status() == StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    let draining = Instant::now();

    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "the server did not exit within 20 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    let mut last = Vec::new();
    for chain in chains {
        let (token, answered) = chain.await.unwrap();
        let during_delay = answered.iter().filter(|t| **t > draining).count();
        assert!(
            during_delay > 0,
            "no refresh was served once readiness was 503"
        );
        last.push(token);
    }
    let log = json_log(&log_path);
    assert!(log.iter().any(|l| l["message"] == "stopped"), "{log:?}");
    std::fs::remove_file(&log_path).ok();

    // Every chain goes on at another instance with the last token it was answered: no
    // rotation was lost, none was committed without its answer (that token would then
    // be reuse, with no grace window), and none was answered without being committed.
    let second = loop {
        match Application::build(settings.clone()).await {
            Ok(app) => break serve(app, settings.clone()),
            Err(e) if signalled.elapsed() < Duration::from_secs(30) => {
                eprintln!("waiting for the data to be free: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e:#}"),
        }
    };
    for token in last {
        second.refresh_ok(&token).await;
    }
}
