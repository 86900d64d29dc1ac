use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

/// Runs the real binary at debug level, drives a whole token lifecycle through it, and
/// checks that no password, token or hash ever reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_sensitive_is_logged_even_at_debug_level() {
    let settings = test_settings();
    let (mut cmd, log_path) = server_binary(&settings);
    let mut child = cmd
        .env("TESSERA__PASSWORD__MEMORY_KIB", "256")
        .env("TESSERA__PASSWORD__ITERATIONS", "1")
        .env("TESSERA__PASSWORD__ALLOW_WEAK", "true")
        .env("TESSERA__LOG__LEVEL", "debug")
        .spawn()
        .unwrap();

    let mut address = None;
    eventually("the server logs its address", || {
        address = json_log(&log_path)
            .into_iter()
            .find(|l| l["message"] == "tessera listening")
            .and_then(|l| l["address"].as_str().map(String::from));
        std::future::ready(address.is_some())
    })
    .await;
    let base = format!("http://{}", address.unwrap());
    let client = reqwest::Client::new();
    let post = |path: &str, body: Value| client.post(format!("{base}{path}")).json(&body).send();

    let email = "logged@example.com";
    let created = post("/users", json!({"email": email, "password": PASSWORD}))
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let failed = post(
        "/login",
        json!({"email": email, "password": "a wrong password"}),
    )
    .await
    .unwrap();
    assert_eq!(failed.status(), StatusCode::UNAUTHORIZED);
    let login = post("/login", json!({"email": email, "password": PASSWORD}))
        .await
        .unwrap();
    let login = Tokens::from_body(login.json().await.unwrap());
    let next = post("/refresh", json!({"refresh_token": login.refresh}))
        .await
        .unwrap();
    let next = Tokens::from_body(next.json().await.unwrap());
    let me = client
        .get(format!("{base}/me"))
        .bearer_auth(&next.access)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    let logout = client
        .post(format!("{base}/logout"))
        .bearer_auth(&next.access)
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    let hash: String = {
        let mut db = connect_db(&settings).await;
        sqlx::query_scalar("SELECT password_hash FROM users")
            .fetch_one(&mut db)
            .await
            .unwrap()
    };
    child.kill().unwrap();
    child.wait().unwrap();

    let log = std::fs::read_to_string(&log_path).unwrap();
    std::fs::remove_file(&log_path).ok();
    assert!(log.lines().count() > 10, "debug logging was on");
    assert!(log.contains(r#""path":"/refresh""#), "requests were logged");
    let mut secrets = vec![
        PASSWORD,
        "a wrong password",
        &login.refresh,
        &next.refresh,
        &login.access,
        &next.access,
    ];
    secrets.extend(hash.rsplit('$').take(2)); // the salt and the hash
    for secret in secrets {
        assert!(!log.contains(secret), "the log contains a secret: {secret}");
    }
}
