//! User administration through HTTP: list with an email-prefix search and keyset
//! paging, show, create (with a password, or with an invitation through a real SMTP
//! server), and an admin's reset link.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tessera::config::EmailVerification;

use crate::helpers::*;
use crate::smtp::{Options, SmtpServer, link, mailing};

const WAIT: Duration = Duration::from_secs(10);

async fn get(app: &TestApp, token: &str, path: &str) -> reqwest::Response {
    app.call(Method::GET, path, token, None).await
}

fn emails(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|u| u["email"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn users_are_listed_by_email_prefix_in_pages() {
    let app = spawn_app().await;
    let admin = app.admin().await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let mut mine: Vec<String> = ["carol", "alice", "bob", "dave", "Erin"]
        .iter()
        .map(|n| format!("{tag}-{n}@example.com"))
        .collect();
    for email in &mine {
        assert_eq!(
            app.register(email, PASSWORD).await.status(),
            StatusCode::CREATED
        );
    }
    mine.sort_by_key(|e| e.to_lowercase());

    // The prefix is case-insensitive; the list is sorted by email.
    let res = get(
        &app,
        &admin.access,
        &format!("/admin/users?email={}", tag.to_uppercase()),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(emails(&res.json().await.unwrap()), mine);

    // Pages of two, each after the last email of the one before.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/admin/users?email={tag}&limit=2");
        if let Some(a) = &after {
            path.push_str(&format!("&after={}", a.replace('@', "%40")));
        }
        let page = emails(&get(&app, &admin.access, &path).await.json().await.unwrap());
        assert!(page.len() <= 2);
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        seen.extend(page);
    }
    assert_eq!(seen, mine);

    for bad in ["limit=0", "limit=1001", "limit=x", "sort=email"] {
        let res = get(&app, &admin.access, &format!("/admin/users?{bad}")).await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let user = app.login_ok(&mine[0]).await;
    let res = get(&app, &user.access, "/admin/users").await;
    assert_error(res, StatusCode::FORBIDDEN, "insufficient_scope").await;
}

#[tokio::test]
async fn a_user_is_shown_with_the_contract_fields() {
    let app = spawn_app().await;
    let admin = app.admin().await;
    let email = app.new_user().await;
    let id = app.user_id(&email).await;
    let path = format!("/admin/users/{id}");
    let user: Value = get(&app, &admin.access, &path).await.json().await.unwrap();
    for field in [
        "id",
        "email",
        "email_verified",
        "roles",
        "disabled",
        "created_at",
        "last_login_at",
        "is_anonymous",
    ] {
        assert!(user.get(field).is_some(), "{field} missing: {user}");
    }
    assert_eq!(user["email"], email.as_str());
    assert_eq!(user["is_anonymous"], false);
    assert!(user["last_login_at"].is_null());
    app.login_ok(&email).await;
    let user: Value = get(&app, &admin.access, &path).await.json().await.unwrap();
    assert!(user["last_login_at"].is_string(), "{user}");

    let unknown = format!("/admin/users/{}", uuid::Uuid::new_v4());
    let res = get(&app, &admin.access, &unknown).await;
    assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn an_admin_creates_users_with_a_password_or_an_invitation() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Off)).await;
    let admin = app.admin().await;
    let create = |body: Value| {
        let app = &app;
        let token = admin.access.clone();
        async move {
            app.call(Method::POST, "/admin/users", &token, Some(&body))
                .await
        }
    };

    let with_password = format!("p-{}@example.com", uuid::Uuid::new_v4().simple());
    let res =
        create(json!({"email": with_password, "password": PASSWORD, "roles": ["user", "support"]}))
            .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let user: Value = res.json().await.unwrap();
    assert_eq!(user["roles"], json!(["support", "user"]));
    app.login_ok(&with_password).await;
    let res = create(json!({"email": with_password.to_uppercase(), "password": PASSWORD})).await;
    assert_error(res, StatusCode::CONFLICT, "conflict").await;
    for bad in [
        json!({"email": "nope"}),
        json!({"email": "x@example.com", "password": "short"}),
        json!({"email": "x@example.com", "roles": ["has space"]}),
        json!({"email": "x@example.com", "extra": 1}),
    ] {
        assert_error(
            create(bad).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
    }

    // Without a password: an invitation, which sets one.
    let invited = format!("i-{}@example.com", uuid::Uuid::new_v4().simple());
    let res = create(json!({"email": invited})).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let mail = server.wait_for(1, WAIT).await.remove(0);
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("You have been invited")
    );
    assert_eq!(
        mail.header("X-Test-Envelope-To").as_deref(),
        Some(invited.as_str())
    );
    let (action, token) = link(&mail);
    assert_eq!(action, "reset_password");
    let chosen = "my own passphrase";
    let res = app
        .post_json(
            "/password/reset",
            &json!({"token": token, "new_password": chosen}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    app.login_ok_with(&invited, chosen).await;
    assert!(
        app.audit_kinds()
            .await
            .contains(&"invitation_sent".to_owned())
    );
}

#[tokio::test]
async fn an_admin_sends_a_reset_link() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Off)).await;
    let admin = app.admin().await;
    let email = app.new_user().await;
    let id = app.user_id(&email).await;
    let path = format!("/admin/users/{id}/password-reset");
    let res = app.call(Method::POST, &path, &admin.access, None).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let (_, token) = link(&server.wait_for(1, WAIT).await[0]);
    let res = app
        .post_json(
            "/password/reset",
            &json!({"token": token, "new_password": "reset by admin"}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    app.login_ok_with(&email, "reset by admin").await;
    let unknown = format!("/admin/users/{}/password-reset", uuid::Uuid::new_v4());
    let res = app.call(Method::POST, &unknown, &admin.access, None).await;
    assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
}
