use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn registering_returns_the_user_and_stores_only_an_argon2id_hash() {
    let app = spawn_app().await;
    let res = app.register("New.User@Example.com", PASSWORD).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["email"], "New.User@Example.com");
    assert!(uuid::Uuid::parse_str(body["id"].as_str().unwrap()).is_ok());
    assert!(body["created_at"].as_str().is_some());
    assert!(body.get("password_hash").is_none());

    let mut db = app.db().await;
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains(PASSWORD));
}

#[tokio::test]
async fn registering_an_existing_email_in_any_case_is_a_conflict() {
    let app = spawn_app().await;
    app.register("dup@example.com", PASSWORD).await;
    let res = app.register("DUP@Example.COM", PASSWORD).await;
    assert_error(res, StatusCode::CONFLICT, "conflict").await;
}

#[tokio::test]
async fn registration_rejects_bad_emails_and_passwords() {
    let app = spawn_app().await;
    let cases = [
        json!({"email": "not-an-email", "password": PASSWORD}),
        json!({"email": "a@example.com", "password": "short"}),
        json!({"email": "a@example.com", "password": "x".repeat(1025)}),
        json!({"email": "a@example.com"}),
        json!({"password": PASSWORD}),
        json!({"email": 5, "password": PASSWORD}),
    ];
    for body in cases {
        let res = app.post_json("/users", &body).await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
}

#[tokio::test]
async fn passwords_are_compared_exactly_as_typed() {
    let app = spawn_app().await;
    app.register("exact@example.com", " Pass word ").await;
    for wrong in ["Pass word", " pass word ", " Pass word", " PASS WORD "] {
        let res = app.login("exact@example.com", wrong).await;
        assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    }
    assert_eq!(
        app.login("EXACT@example.com", " Pass word ").await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn registration_can_be_turned_off() {
    let mut settings = test_settings();
    settings.registration.enabled = false;
    let app = spawn_app_with(settings).await;
    let res = app.register("x@example.com", PASSWORD).await;
    assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn production_argon2_parameters_are_the_default() {
    let mut settings = test_settings();
    let defaults = tessera::config::Settings::load_from(None, Vec::new()).unwrap();
    settings.password = defaults.password;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let mut db = app.db().await;
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    app.login_ok(&email).await;
}

#[tokio::test]
async fn me_returns_the_current_user_and_session() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    let res = app.me(&tokens.access).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["email"], email.as_str());
    assert_eq!(body["roles"], json!(["user"]));
    assert_eq!(body["session_id"], tokens.session_id.as_str());
    assert!(body["id"].as_str().is_some());
}

#[tokio::test]
async fn me_gives_each_user_their_own_email_whether_the_server_remembers_it_or_not() {
    // A cache smaller than the user count (entries come and go), one that holds them
    // all, and none.
    for capacity in [2, 1000, 0] {
        let mut settings = test_settings();
        settings.cache.user_emails = capacity;
        let app = spawn_app_with(settings).await;
        let mut users = Vec::new();
        for _ in 0..5 {
            let email = app.new_user().await;
            let tokens = app.login_ok(&email).await;
            users.push((email, tokens));
        }
        for round in 0..3 {
            for (email, tokens) in &users {
                let res = app.me(&tokens.access).await;
                assert_eq!(res.status(), StatusCode::OK);
                let body: Value = res.json().await.unwrap();
                assert_eq!(
                    body["email"],
                    email.as_str(),
                    "capacity {capacity}, round {round}"
                );
                assert_eq!(body["session_id"], tokens.session_id.as_str());
            }
        }
    }
}

#[tokio::test]
async fn me_without_a_valid_bearer_token_is_401_with_a_challenge() {
    let app = spawn_app().await;
    assert_invalid_token(app.get("/me").await).await;
    assert_invalid_token(app.me("garbage").await).await;
    let basic = app
        .client
        .get(app.url("/me"))
        .basic_auth("a", Some("b"))
        .send()
        .await
        .unwrap();
    assert_invalid_token(basic).await;
}

#[tokio::test]
async fn registration_shares_the_per_ip_budget() {
    let mut settings = test_settings();
    settings.login.per_ip_per_minute = 2;
    let app = spawn_app_with(settings).await;
    app.new_user().await;
    app.new_user().await;
    let res = app.register("third@example.com", PASSWORD).await;
    assert!(res.headers().contains_key("retry-after"));
    assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
}

#[tokio::test]
async fn stored_hashes_follow_the_configured_parameters_on_login() {
    let old = spawn_app().await;
    let email = old.new_user().await;
    let old_settings = old.settings.clone();
    let mut settings = old.settings.clone();
    settings.password.memory_kib = 512;
    let new = restart(old, &settings).await;
    let mut db = new.db().await;
    let stored = || sqlx::query_scalar::<_, String>("SELECT password_hash FROM users");
    assert!(
        stored()
            .fetch_one(&mut db)
            .await
            .unwrap()
            .contains("m=256,")
    );
    assert_eq!(
        new.login(&email, "wrong password").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(
        stored()
            .fetch_one(&mut db)
            .await
            .unwrap()
            .contains("m=256,"),
        "no upgrade on a failed login"
    );
    new.login_ok(&email).await;
    let upgraded = stored().fetch_one(&mut db).await.unwrap();
    assert!(
        upgraded.starts_with("$argon2id$v=19$m=512,t=1,p=1$"),
        "{upgraded}"
    );
    new.login_ok(&email).await;
    // An instance still on the old parameters verifies the upgraded hash.
    let old = restart(new, &old_settings).await;
    old.login_ok(&email).await;
}

/// One normalization for lookup, uniqueness and throttling: an address that the
/// database's locale would fold differently (İ → i) is not a second way into the
/// account with a budget of its own.
#[tokio::test]
async fn emails_are_normalized_once_for_lookup_uniqueness_and_throttling() {
    let settings = with_failure_budget(2, 60, 60);
    let app = spawn_app_with(settings).await;
    let dotted = "İrem@example.com";
    assert_eq!(
        app.register(dotted, PASSWORD).await.status(),
        StatusCode::CREATED
    );
    // The same address in another case or composition is the same account ...
    let lowered = "i\u{307}rem@EXAMPLE.com";
    assert_eq!(
        app.register(lowered, PASSWORD).await.status(),
        StatusCode::CONFLICT
    );
    app.login_ok(lowered).await;
    // ... and shares its budget: two failures, then the account waits, in every form.
    for _ in 0..2 {
        assert_eq!(
            app.login(dotted, "wrong password").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    for form in [dotted, lowered, "İREM@example.com"] {
        assert_eq!(
            app.login(form, PASSWORD).await.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{form}"
        );
    }
    // A plain i is another address: never a way into İrem's account.
    let res = app.login("irem@example.com", PASSWORD).await;
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    assert_eq!(
        app.register("irem@example.com", PASSWORD).await.status(),
        StatusCode::CREATED
    );
    // The stored form is the normalized one.
    let mut db = app.db().await;
    let stored: String = sqlx::query_scalar("SELECT email_normalized FROM users WHERE email = $1")
        .bind(dotted)
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(stored, "i\u{307}rem@example.com");
}

/// Rows from before the stored normalization got SQL's lower(); `tessera migrate` (and
/// every start) gives non-ASCII ones the Rust form.
#[tokio::test]
async fn migrate_renormalizes_emails_that_sql_lower_folded_differently() {
    // About rows PostgreSQL migrations wrote before the stored normalization; SQLite
    // databases never held them.
    crate::shared_backend_only!();
    let app = spawn_app().await;
    let email = "ΟΔΟΣ-İ@example.com";
    assert_eq!(
        app.register(email, PASSWORD).await.status(),
        StatusCode::CREATED
    );
    let mut db = app.db().await;
    sqlx::query("UPDATE users SET email_normalized = lower(email) WHERE email = $1")
        .bind(email)
        .execute(&mut db)
        .await
        .unwrap();
    let out = crate::keys::tessera(&app, &["migrate"]);
    assert!(out.status.success());
    let stored: String = sqlx::query_scalar("SELECT email_normalized FROM users WHERE email = $1")
        .bind(email)
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(stored, "οδος-i\u{307}@example.com");
    app.login_ok("οδος-i\u{307}@example.com").await;
}

#[tokio::test]
async fn with_auto_migrate_off_the_server_waits_for_tessera_migrate() {
    let mut settings = test_settings();
    settings.database.auto_migrate = false;
    let app = spawn_app_with(settings).await;
    let mut db = app.db().await;
    let tables: i64 = sqlx::query_scalar(app.pick(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'users'",
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'users'",
    ))
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(tables, 0, "nothing migrated on start");
    let res = app.register("early@example.com", PASSWORD).await;
    assert!(res.status().is_server_error(), "{}", res.status());
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(
        !body.to_string().contains("relation"),
        "no SQL in the body: {body}"
    );

    let out = crate::keys::tessera(&app, &["migrate"]);
    assert!(out.status.success());
    assert_eq!(
        app.register("early@example.com", PASSWORD).await.status(),
        StatusCode::CREATED
    );
    app.login_ok("early@example.com").await;
}
