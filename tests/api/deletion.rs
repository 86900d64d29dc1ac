//! Account deletion (`DELETE /me`, `DELETE /admin/users/{id}`) and the last-admin
//! guard, through HTTP: everything of the user goes at once, every access token fails
//! at once, audit rows keep only ids, the email can register again.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use tessera::config::EmailVerification;

use crate::helpers::*;
use crate::smtp::{Options, SmtpServer, mailing};

async fn delete_me(app: &TestApp, access: &str, password: &str) -> reqwest::Response {
    app.call(
        Method::DELETE,
        "/me",
        access,
        Some(&json!({ "password": password })),
    )
    .await
}

async fn count(app: &TestApp, sql: String, id: uuid::Uuid) -> i64 {
    let mut db = app.db().await;
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(id.to_string())
        .fetch_one(&mut db)
        .await
        .unwrap()
}

#[tokio::test]
async fn deleting_ones_account_removes_everything_and_kills_every_token_at_once() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let id = app.user_id(&email).await;
    let one = app.login_ok(&email).await;
    let two = app.login_ok(&email).await;
    app.me(&two.access).await; // remembered by this instance

    assert_eq!(
        delete_me(&app, &one.access, PASSWORD).await.status(),
        StatusCode::NO_CONTENT
    );
    for t in [&one, &two] {
        assert_invalid_token(app.me(&t.access).await).await;
        assert_invalid_grant(app.refresh(&t.refresh).await, "unknown").await;
    }
    assert_error(
        app.login(&email, PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    let cast = app.pick("CAST($1 AS uuid)", "$1");
    for (table, column) in [
        ("users", "id"),
        ("sessions", "user_id"),
        ("devices", "user_id"),
        ("email_tokens", "user_id"),
    ] {
        let sql = format!("SELECT count(*) FROM {table} WHERE {column} = {cast}");
        assert_eq!(count(&app, sql.clone(), id).await, 0, "{table}");
    }
    // The audit trail keeps what happened, with the id alone.
    let sql = format!(
        "SELECT count(*) FROM audit_events WHERE user_id = {cast} \
         AND (ip IS NOT NULL OR user_agent IS NOT NULL)"
    );
    assert_eq!(count(&app, sql.clone(), id).await, 0);
    let sql = format!("SELECT count(*) FROM audit_events WHERE user_id = {cast}");
    assert!(count(&app, sql.clone(), id).await >= 3); // created, logins, deleted
    assert!(app.audit_kinds().await.contains(&"user_deleted".to_owned()));

    // The email is free again, for a new user.
    assert_eq!(
        app.register(&email, PASSWORD).await.status(),
        StatusCode::CREATED
    );
    assert_ne!(app.user_id(&email).await, id);
}

#[tokio::test]
async fn a_wrong_password_or_no_password_deletes_nothing() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let res = delete_me(&app, &t.access, "not the password").await;
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let res = app
        .call(Method::DELETE, "/me", &t.access, Some(&json!({})))
        .await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    let res = app
        .client
        .delete(app.url("/me"))
        .json(&json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_invalid_token(res).await;
    assert_eq!(app.me(&t.access).await.status(), StatusCode::OK);
    app.refresh_ok(&t.refresh).await;
    assert!(
        app.audit_kinds()
            .await
            .contains(&"user_deletion_failed".to_owned())
    );
}

#[tokio::test]
async fn mail_waiting_for_a_deleted_user_goes_with_them() {
    let mut server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Optional)).await;
    server.pause().await;
    let email = format!("d-{}@example.com", uuid::Uuid::new_v4().simple());
    app.register(&email, PASSWORD).await;
    let t = app.login_ok(&email).await;
    assert_eq!(app.state.auth.store.outbox_len().await.unwrap(), 1);
    assert_eq!(
        delete_me(&app, &t.access, PASSWORD).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.state.auth.store.outbox_len().await.unwrap(), 0);
    server.resume().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn an_admin_deletes_a_user_but_never_the_last_enabled_admin() {
    let app = spawn_app().await;
    let admin = app.admin().await;
    let me: serde_json::Value = app.me(&admin.access).await.json().await.unwrap();
    let admin_id = me["id"].as_str().unwrap().to_owned();
    let email = app.new_user().await;
    let id = app.user_id(&email).await;
    let t = app.login_ok(&email).await;

    let user_path = format!("/admin/users/{id}");
    let res = app.call(Method::DELETE, &user_path, &t.access, None).await;
    assert_error(res, StatusCode::FORBIDDEN, "insufficient_scope").await;
    let res = app
        .call(Method::DELETE, &user_path, &admin.access, None)
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_invalid_token(app.me(&t.access).await).await;
    let res = app
        .call(Method::DELETE, &user_path, &admin.access, None)
        .await;
    assert_error(res, StatusCode::NOT_FOUND, "not_found").await;

    // The only enabled admin cannot be deleted, disabled or demoted.
    let admin_path = format!("/admin/users/{admin_id}");
    let res = app
        .call(Method::DELETE, &admin_path, &admin.access, None)
        .await;
    assert_error(res, StatusCode::CONFLICT, "conflict").await;
    for patch in [json!({"disabled": true}), json!({"roles": ["user"]})] {
        let res = app
            .call(Method::PATCH, &admin_path, &admin.access, Some(&patch))
            .await;
        assert_error(res, StatusCode::CONFLICT, "conflict").await;
    }
    let res = delete_me(&app, &admin.access, PASSWORD).await;
    assert_error(res, StatusCode::CONFLICT, "conflict").await;
    assert_eq!(app.me(&admin.access).await.status(), StatusCode::OK);

    // With a second admin, the first may go.
    let second = app.admin().await;
    let res = app
        .call(Method::DELETE, &admin_path, &second.access, None)
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
}
