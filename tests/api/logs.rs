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
        .env("TESSERA__COOKIES__SECURE", "false")
        .env(
            "TESSERA__SERVER__CORS_ALLOWED_ORIGINS",
            "http://app.example.test",
        )
        .spawn()
        .unwrap();

    let base = listening_at(&log_path).await;
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

    // A browser session: its refresh cookie, CSRF token and device cookie stay out of
    // the log too, whether set or sent.
    let cookie_login = post(
        "/login",
        json!({"email": email, "password": PASSWORD, "token_delivery": "cookie"}),
    )
    .await
    .unwrap();
    let set: Vec<String> = cookie_login
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let value = |name: &str| {
        set.iter()
            .find_map(|c| c.strip_prefix(&format!("{name}=")))
            .and_then(|rest| rest.split(';').next())
            .unwrap_or_else(|| panic!("no {name} in {set:?}"))
            .to_owned()
    };
    let (refresh_cookie, csrf, device) = (
        value("tessera_refresh"),
        value("tessera_csrf"),
        value("tessera_device"),
    );
    let rotated = client
        .post(format!("{base}/refresh"))
        .header(
            "cookie",
            format!("tessera_refresh={refresh_cookie}; tessera_device={device}"),
        )
        .header("origin", "http://app.example.test")
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), StatusCode::OK);
    let rotated_cookie = rotated
        .headers()
        .get_all("set-cookie")
        .iter()
        .find_map(|v| v.to_str().unwrap().strip_prefix("tessera_refresh="))
        .and_then(|rest| rest.split(';').next())
        .unwrap()
        .to_owned();
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
    let warned = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|l| {
            l["level"] == "WARN"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("cookies.secure = false"))
        });
    assert!(warned, "cookies.secure = false is warned about at start");
    let mut secrets = vec![
        PASSWORD,
        "a wrong password",
        &login.refresh,
        &next.refresh,
        &login.access,
        &next.access,
        &refresh_cookie,
        &rotated_cookie,
        &csrf,
        &device,
    ];
    secrets.extend(hash.rsplit('$').take(2)); // the salt and the hash
    for secret in secrets {
        assert!(!log.contains(secret), "the log contains a secret: {secret}");
    }
}
