use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

/// Sends raw bytes and returns the status code and body of the response, or `None`
/// when the server closed the connection without answering (a refusal too: a server
/// may reset a connection whose request it will not read to the end).
async fn raw(app: &TestApp, request: Vec<u8>) -> Option<(u16, String)> {
    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(&request).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = std::time::Duration::from_secs(10);
    while let Ok(Ok(n)) = tokio::time::timeout(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok())?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

async fn send(
    app: &TestApp,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut req = app.client.post(app.url(path)).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn malformed_bodies_get_400_invalid_request() {
    let app = spawn_app().await;
    let json_ct = Some("application/json");
    let cases: Vec<(&str, Option<&str>, Vec<u8>)> = vec![
        ("/login", json_ct, b"{not json".to_vec()),
        ("/login", json_ct, b"".to_vec()),
        ("/login", json_ct, b"[]".to_vec()),
        (
            "/login",
            json_ct,
            b"{\"email\": \"a@b.io\", \"password\": \"\xff\xfe\"}".to_vec(),
        ),
        (
            "/login",
            json_ct,
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
        ),
        (
            "/login",
            Some("text/plain"),
            br#"{"email":"a@b.io","password":"password1"}"#.to_vec(),
        ),
        (
            "/login",
            None,
            br#"{"email":"a@b.io","password":"password1"}"#.to_vec(),
        ),
        (
            "/login",
            Some("application/json; charset=utf-8; garbage"),
            b"{}".to_vec(),
        ),
        ("/refresh", json_ct, br#"{"refresh_token": 42}"#.to_vec()),
        (
            "/users",
            Some("application/x-www-form-urlencoded"),
            b"email=a@b.io&password=password1".to_vec(),
        ),
        (
            "/token",
            Some("application/x-www-form-urlencoded"),
            b"grant_type=refresh_token&refresh_token=\xff\xfe".to_vec(),
        ),
        (
            "/token",
            Some("text/plain"),
            b"grant_type=refresh_token".to_vec(),
        ),
        (
            "/revoke",
            Some("application/x-www-form-urlencoded"),
            b"token_type_hint=x".to_vec(),
        ),
    ];
    for (path, ct, body) in cases {
        let res = send(&app, path, ct, body.clone()).await;
        let status = res.status();
        let body_text = res.text().await.unwrap();
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{path} {ct:?} {:?}: {body_text}",
            String::from_utf8_lossy(&body)
        );
        let parsed: Value = serde_json::from_str(&body_text).unwrap();
        assert_eq!(parsed["error"], "invalid_request");
    }
}

#[tokio::test]
async fn error_descriptions_never_echo_submitted_values() {
    let app = spawn_app().await;
    let secret = "hunter2-the-secret-password";
    let res = app
        .post_json(
            "/login",
            &json!({"email": "a@b.io", "password": 12345, "remember_me": secret}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let text = res.text().await.unwrap();
    assert!(!text.contains(secret) && !text.contains("12345"), "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"],
        "invalid_request"
    );
    for body in [
        json!({"email": "a@b.io", "password": [secret]}),
        json!({"email": format!("{secret} not an email"), "password": "whatever"}),
        json!({"email": "a@b.io", "password": "short", "device_token": {"x": secret}}),
    ] {
        let res = app.post_json("/login", &body).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{body}");
        let text = res.text().await.unwrap();
        assert!(!text.contains(secret), "{text}");
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["error"], "invalid_request", "{text}");
        assert!(
            parsed["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        );
    }
}

#[tokio::test]
async fn bodies_over_64_kib_get_413_whether_announced_or_streamed() {
    let app = spawn_app().await;
    let big = format!(
        r#"{{"email":"a@b.io","password":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let res = send(
        &app,
        "/login",
        Some("application/json"),
        big.clone().into_bytes(),
    )
    .await;
    assert_error(res, StatusCode::PAYLOAD_TOO_LARGE, "invalid_request").await;

    // Chunked, so no Content-Length warns the server in advance.
    let mut request = b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for chunk in big.as_bytes().chunks(8 * 1024) {
        request.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend(chunk);
        request.extend(b"\r\n");
    }
    request.extend(b"0\r\n\r\n");
    let (status, body) = raw(&app, request).await.expect("an answer");
    assert_eq!(status, 413, "{body}");

    // Every endpoint that takes a body enforces the limit, with any content type; the
    // ones behind a Bearer token with a valid one, so that the body is what is refused.
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    for (method, path, ct) in [
        (reqwest::Method::POST, "/users", "application/json"),
        (reqwest::Method::POST, "/refresh", "application/json"),
        (reqwest::Method::POST, "/logout", "application/json"),
        (reqwest::Method::PUT, "/me/password", "application/json"),
        (
            reqwest::Method::POST,
            "/token",
            "application/x-www-form-urlencoded",
        ),
        (
            reqwest::Method::POST,
            "/revoke",
            "application/x-www-form-urlencoded",
        ),
        (
            reqwest::Method::POST,
            "/introspect",
            "application/x-www-form-urlencoded",
        ),
    ] {
        let res = app
            .client
            .request(method, app.url(path))
            .bearer_auth(&t.access)
            .header("content-type", ct)
            .body(vec![b'a'; 65 * 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        assert_error(res, StatusCode::PAYLOAD_TOO_LARGE, "invalid_request").await;
    }
    // The refused logout ended nothing.
    assert_eq!(app.me(&t.access).await.status(), StatusCode::OK);

    // Just under the limit is fine (and then fails on its merits).
    let ok = format!(r#"{{"email":"a@b.io","password":"{}"}}"#, "x".repeat(1000));
    assert_eq!(
        send(&app, "/login", Some("application/json"), ok.into_bytes())
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn absurd_headers_get_4xx_and_the_server_keeps_working() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let huge_token = "a".repeat(20 * 1024);
    assert_invalid_token(app.me(&huge_token).await).await;
    for authorization in [
        reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        reqwest::header::HeaderValue::from_static("Bearer"),
    ] {
        let res = app
            .client
            .get(app.url("/me"))
            .header("authorization", authorization)
            .send()
            .await
            .unwrap();
        assert_invalid_token(res).await;
    }
    // Sent raw: an HTTP client would refuse to send it at all.
    let request = b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 99999999999999999999\r\nConnection: close\r\n\r\n{}".to_vec();
    let (status, _) = raw(&app, request)
        .await
        .expect("an answer, not a dropped connection");
    assert!((400..500).contains(&status), "{status}");

    // A megabyte of headers.
    let mut request = b"GET /me HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
    for i in 0..2000 {
        request.extend(format!("X-Junk-{i}: {}\r\n", "j".repeat(500)).as_bytes());
    }
    request.extend(b"\r\n");
    let (status, _) = raw(&app, request)
        .await
        .expect("an answer, not a dropped connection");
    assert!((400..500).contains(&status), "{status}");

    // A non-UTF-8 user agent is stored as nothing rather than failing the login.
    let res = app
        .client
        .post(app.url("/login"))
        .header(
            "user-agent",
            reqwest::header::HeaderValue::from_bytes(b"agent \xff").unwrap(),
        )
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    app.login_ok(&email).await;
}
