use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

const NEW_PASSWORD: &str = "a brand new passphrase";

#[tokio::test]
async fn password_change_ends_the_other_sessions_but_not_the_current_one() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let here = app.login_ok(&email).await;
    let there = app.login_ok(&email).await;
    let elsewhere = app.login_ok(&email).await;

    let res = app
        .change_password(&here.access, PASSWORD, NEW_PASSWORD)
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);

    for other in [&there, &elsewhere] {
        assert_invalid_token(app.me(&other.access).await).await;
        assert_invalid_grant(app.refresh(&other.refresh).await, "revoked").await;
    }
    assert_eq!(app.me(&here.access).await.status(), StatusCode::OK);
    let here = app.refresh_ok(&here.refresh).await;
    assert_eq!(app.me(&here.access).await.status(), StatusCode::OK);
    assert_eq!(app.sessions(&here.access).await.len(), 1);

    assert_error(
        app.login(&email, PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    let res = app.login(&email, NEW_PASSWORD).await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_wrong_current_password_changes_nothing() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let here = app.login_ok(&email).await;
    let there = app.login_ok(&email).await;

    let res = app
        .change_password(&here.access, "not my password", NEW_PASSWORD)
        .await;
    assert!(
        res.headers().get("www-authenticate").is_none(),
        "not a token problem: the client must not refresh and retry"
    );
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    assert_eq!(app.me(&there.access).await.status(), StatusCode::OK);
    app.login_ok(&email).await;
    assert_eq!(
        app.login(&email, NEW_PASSWORD).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn password_change_validates_its_input() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let short = app.change_password(&t.access, PASSWORD, "short").await;
    let body = assert_error(short, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("new_password")
    );
    let missing = json!({"current_password": PASSWORD});
    let res = app
        .call(Method::PUT, "/me/password", &t.access, Some(&missing))
        .await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    let res = app
        .client
        .put(app.url("/me/password"))
        .json(&json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_invalid_token(res).await;
    // Nothing changed.
    app.login_ok(&email).await;
}

#[tokio::test]
async fn password_change_attempts_share_the_login_budget() {
    let settings = with_failure_budget(2, 60, 60);
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    for _ in 0..2 {
        let res = app.change_password(&t.access, "guess", NEW_PASSWORD).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    let hashes = app.state.auth.hasher.argon2_runs();
    let res = app.change_password(&t.access, PASSWORD, NEW_PASSWORD).await;
    assert!(res.headers().contains_key("retry-after"));
    assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(app.state.auth.hasher.argon2_runs(), hashes, "no hashing");
}

#[tokio::test]
async fn failed_logins_hold_password_changes_in_the_same_budget() {
    let settings = with_failure_budget(2, 60, 60);
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    for _ in 0..2 {
        assert_eq!(
            app.login(&email, "wrong password").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let hashes = app.state.auth.hasher.argon2_runs();
    let res = app.change_password(&t.access, PASSWORD, NEW_PASSWORD).await;
    assert!(res.headers().contains_key("retry-after"));
    assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(app.state.auth.hasher.argon2_runs(), hashes, "no hashing");
    // The owner's known device is not held: its password change goes through.
    let body = json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD,
                      "device_token": t.body["device_token"]});
    let res = app
        .call(reqwest::Method::PUT, "/me/password", &t.access, Some(&body))
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
}

async fn stored_hash(db: &mut sqlx::AnyConnection, email: &str) -> String {
    sqlx::query_scalar("SELECT password_hash FROM users WHERE email = $1")
        .bind(email)
        .fetch_one(db)
        .await
        .unwrap()
}

/// What a login does once the password is verified: create the session, on condition
/// that the user still has the `verified` hash and is enabled.
async fn create_session(app: &TestApp, user: uuid::Uuid, verified: &str) -> bool {
    use tessera::domain::{SessionId, UserId};
    use tessera::store::{ClientInfo, NewSession};
    let created = app
        .state
        .auth
        .store
        .create_session(NewSession {
            id: SessionId(uuid::Uuid::new_v4()),
            user_id: UserId(user),
            remember_me: false,
            expires_at: chrono::Utc::now() + chrono::Duration::hours(1),
            refresh_hash: uuid::Uuid::new_v4().as_bytes(),
            password_hash: verified,
            client: &ClientInfo::default(),
            max_per_user: 0,
            recent_secs: 0,
            device_hash: uuid::Uuid::new_v4().as_bytes(),
            device_ttl_secs: 60,
            chain_hash: uuid::Uuid::new_v4().as_bytes(),
            notice: None,
            amr: &["pwd".to_owned()],
        })
        .await
        .unwrap();
    created.is_some()
}

/// The end of a login that verified the password just before it was changed (or the
/// user disabled): no session may come out of the outdated verification.
#[tokio::test]
async fn a_login_verified_against_an_outdated_hash_creates_no_session() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let id = app.user_id(&email).await;
    let mut db = app.db().await;
    let verified = stored_hash(&mut db, &email).await;
    assert!(create_session(&app, id, &verified).await, "current hash");

    let t = app.login_ok(&email).await;
    let res = app.change_password(&t.access, PASSWORD, NEW_PASSWORD).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert!(!create_session(&app, id, &verified).await, "outdated hash");

    let current = stored_hash(&mut db, &email).await;
    sqlx::query("UPDATE users SET disabled = true")
        .execute(&mut db)
        .await
        .unwrap();
    assert!(!create_session(&app, id, &current).await, "disabled user");
}
