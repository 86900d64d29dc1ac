//! `tessera user list|show|delete|reset`: the real binary against the test's database
//! (and Redis, on PostgreSQL), with the server running beside it as in production.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tessera::config::EmailVerification;

use crate::helpers::{PASSWORD, TestApp, eventually, spawn_app_with};
use crate::keys::cli;
use crate::smtp::{Options, SmtpServer, link, mailing};

/// The binary configured like the server: its database, Redis, keys and email.
pub fn configured(app: &TestApp) -> Command {
    use secrecy::ExposeSecret;
    let s = &app.settings;
    let mut cmd = cli(app);
    cmd.env("TESSERA__REDIS__URL", s.redis.url.expose_secret())
        .env("TESSERA__REDIS__KEY_PREFIX", &s.redis.key_prefix)
        .env(
            "TESSERA__EMAIL__TRANSPORT",
            format!("{:?}", s.email.transport).to_lowercase(),
        )
        .env("TESSERA__EMAIL__SMTP_URL", s.email.smtp_url.expose_secret())
        .env("TESSERA__EMAIL__SMTP_CA_FILE", &s.email.smtp_ca_file)
        .env("TESSERA__EMAIL__LINK_BASE", &s.email.link_base)
        .stdin(Stdio::null());
    cmd
}

fn user_cli(app: &TestApp, args: &[&str]) -> Command {
    let mut cmd = configured(app);
    cmd.args(["user"]).args(args);
    cmd
}

fn run(app: &TestApp, args: &[&str]) -> Output {
    user_cli(app, args).output().unwrap()
}

fn ok(app: &TestApp, args: &[&str]) -> String {
    let out = run(app, args);
    assert!(
        out.status.success(),
        "tessera user {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn refused(app: &TestApp, args: &[&str]) -> String {
    let out = run(app, args);
    assert!(!out.status.success(), "tessera user {args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

#[tokio::test]
async fn the_cli_lists_and_shows_users_and_emails_a_reset_link() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Off)).await;
    let prefix = format!("cli-{}", uuid::Uuid::new_v4().simple());
    let emails: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("{prefix}-{n}@example.com"))
        .collect();
    for email in &emails {
        app.register(email, PASSWORD).await;
    }

    let out = run(
        &app,
        &["list", "--email", &prefix.to_uppercase(), "--limit", "2"],
    );
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("id"));
    assert!(lines[1].contains(&emails[0]) && lines[2].contains(&emails[1]));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!("--after {}", emails[1])),
        "{stderr}"
    );
    let next = ok(&app, &["list", "--email", &prefix, "--after", &emails[1]]);
    assert_eq!(next.lines().count(), 2);
    assert!(next.contains(&emails[2]));
    assert!(refused(&app, &["list", "--limit", "0"]).contains("--limit"));

    let shown: Value = serde_json::from_str(&ok(&app, &["show", &emails[0]])).unwrap();
    assert_eq!(shown["email"], emails[0].as_str());
    assert_eq!(shown["email_verified"], false);
    assert_eq!(shown["roles"], json!(["user"]));
    let id = shown["id"].as_str().unwrap().to_owned();
    let by_id: Value = serde_json::from_str(&ok(&app, &["show", &id])).unwrap();
    assert_eq!(by_id, shown);
    assert!(refused(&app, &["show", "nobody-here@example.com"]).contains("no user"));
    assert!(refused(&app, &["show", "not an email"]).contains("neither"));

    // The link goes through the outbox; the running server delivers it.
    ok(&app, &["reset", &emails[0]]);
    let mail = server.wait_for(1, Duration::from_secs(10)).await.remove(0);
    assert_eq!(
        mail.header("X-Test-Envelope-To").as_deref(),
        Some(emails[0].as_str())
    );
    let (action, token) = link(&mail);
    assert_eq!(action, "reset_password");
    let res = app
        .post_json(
            "/password/reset",
            &json!({"token": token, "new_password": "a brand new password"}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    app.login_ok_with(&emails[0], "a brand new password").await;
    assert!(
        app.audit_kinds()
            .await
            .contains(&"password_reset_requested".to_owned())
    );
}

#[tokio::test]
async fn the_cli_deletes_a_user_whose_tokens_stop_working_but_never_the_last_admin() {
    let app = spawn_app_with(crate::helpers::test_settings()).await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    let sessions = |token: String| {
        let app = &app;
        async move {
            app.call(reqwest::Method::GET, "/sessions", &token, None)
                .await
                .status()
        }
    };
    assert_eq!(sessions(tokens.access.clone()).await, StatusCode::OK);

    // Without a terminal to confirm on, --yes is needed.
    let said = refused(&app, &["delete", &email]);
    assert!(said.contains("--yes"), "{said}");
    assert_eq!(app.login(&email, PASSWORD).await.status(), StatusCode::OK);

    ok(&app, &["delete", &email, "--yes"]);
    // The mark reaches the server at once through Redis, or within a second through
    // the embedded database.
    eventually("the deleted user's access token fails", || {
        let token = tokens.access.clone();
        let sessions = &sessions;
        async move { sessions(token).await == StatusCode::UNAUTHORIZED }
    })
    .await;
    assert_eq!(
        app.refresh(&tokens.refresh).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.login(&email, PASSWORD).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(app.audit_kinds().await.contains(&"user_deleted".to_owned()));
    assert_eq!(
        app.register(&email, PASSWORD).await.status(),
        StatusCode::CREATED
    );

    // The last enabled admin stays.
    let admin = app.admin().await;
    let me: Value = app.me(&admin.access).await.json().await.unwrap();
    let admin_email = me["email"].as_str().unwrap().to_owned();
    let said = refused(&app, &["delete", &admin_email, "--yes"]);
    assert!(said.contains("last enabled admin"), "{said}");
    assert_eq!(app.me(&admin.access).await.status(), StatusCode::OK);
}
