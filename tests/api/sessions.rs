use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

async fn login_as(app: &TestApp, email: &str, user_agent: &str) -> Tokens {
    let res = app
        .client
        .post(app.url("/login"))
        .header("user-agent", user_agent)
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    Tokens::from_body(res.json().await.unwrap())
}

fn find<'a>(sessions: &'a [Value], id: &str) -> &'a Value {
    sessions
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("session {id} not listed"))
}

#[tokio::test]
async fn sessions_lists_live_sessions_with_ip_user_agent_and_current() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let laptop = login_as(&app, &email, "laptop/1.0").await;
    let phone = login_as(&app, &email, "phone/1.0").await;
    let ended = login_as(&app, &email, "kiosk/1.0").await;
    app.logout(&ended.access, None).await;
    // The phone refreshes from a newer app version: its last use changes, not its login.
    let res = app
        .client
        .post(app.url("/refresh"))
        .header("user-agent", "phone/2.0")
        .json(&json!({"refresh_token": phone.refresh}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Then the laptop, the oldest session, refreshes: now it is the most recently used,
    // so use order and creation order disagree.
    let res = app
        .client
        .post(app.url("/refresh"))
        .header("user-agent", "laptop/1.0")
        .json(&json!({"refresh_token": laptop.refresh}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let laptop = Tokens::from_body(res.json().await.unwrap());

    let res = app
        .call(Method::GET, "/sessions", &laptop.access, None)
        .await;
    assert_eq!(res.headers()["cache-control"], "no-store");
    let sessions: Vec<Value> = res.json().await.unwrap();
    assert_eq!(
        sessions.len(),
        2,
        "the ended session is not listed: {sessions:?}"
    );
    // Most recently used first.
    assert_eq!(sessions[0]["id"], laptop.session_id);
    assert_eq!(sessions[1]["id"], phone.session_id);
    let me = find(&sessions, &laptop.session_id);
    assert_eq!(me["current"], true);
    assert_eq!(me["ip"], "127.0.0.1");
    assert_eq!(me["user_agent"], "laptop/1.0");
    let other = find(&sessions, &phone.session_id);
    assert_eq!(other["current"], false);
    assert_eq!(other["user_agent"], "phone/2.0");
    assert_eq!(other["login_user_agent"], "phone/1.0");
    for s in &sessions {
        for field in ["created_at", "last_used_at", "expires_at"] {
            let at = s[field].as_str().unwrap();
            chrono::DateTime::parse_from_rfc3339(at).unwrap();
        }
        assert!(s["last_used_at"].as_str() >= s["created_at"].as_str());
        assert!(s["expires_at"].as_str() > s["last_used_at"].as_str());
    }
}

#[tokio::test]
async fn ending_another_session_kills_its_access_token_at_once() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let here = app.login_ok(&email).await;
    let there = app.login_ok(&email).await;
    assert_eq!(app.me(&there.access).await.status(), StatusCode::OK);

    let path = format!("/sessions/{}", there.session_id);
    let res = app.call(Method::DELETE, &path, &here.access, None).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_invalid_token(app.me(&there.access).await).await;
    assert_invalid_grant(app.refresh(&there.refresh).await, "revoked").await;
    assert_eq!(app.me(&here.access).await.status(), StatusCode::OK);
    let listed = app.sessions(&here.access).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], here.session_id);
    // Ending it again is harmless (a retry after a lost response).
    let res = app.call(Method::DELETE, &path, &here.access, None).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn another_users_session_id_gives_404_like_an_unknown_one() {
    let app = spawn_app().await;
    let victim = app.login_ok(&app.new_user().await).await;
    let attacker = app.login_ok(&app.new_user().await).await;

    let theirs = format!("/sessions/{}", victim.session_id);
    let unknown = format!("/sessions/{}", uuid::Uuid::new_v4());
    let mut bodies = Vec::new();
    for path in [theirs.as_str(), unknown.as_str(), "/sessions/not-a-uuid"] {
        let res = app.call(Method::DELETE, path, &attacker.access, None).await;
        bodies.push(assert_error(res, StatusCode::NOT_FOUND, "not_found").await);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");
    assert_eq!(app.me(&victim.access).await.status(), StatusCode::OK);
    app.refresh_ok(&victim.refresh).await;
    assert!(
        app.sessions(&attacker.access)
            .await
            .iter()
            .all(|s| s["id"] != victim.session_id)
    );
}

#[tokio::test]
async fn session_routes_need_a_valid_access_token() {
    let app = spawn_app().await;
    let t = app.login_ok(&app.new_user().await).await;
    let path = format!("/sessions/{}", t.session_id);
    assert_invalid_token(app.get("/sessions").await).await;
    let res = app.client.delete(app.url(&path)).send().await.unwrap();
    assert_invalid_token(res).await;
    assert_invalid_token(app.call(Method::GET, "/sessions", "garbage", None).await).await;
    app.logout(&t.access, None).await;
    assert_invalid_token(app.call(Method::GET, "/sessions", &t.access, None).await).await;
}
