//! The mailer against a real SMTP server (tests/smtp/server.py): STARTTLS required,
//! implicit TLS, the CA file, AUTH, and which failures are worth a retry.

use std::time::Duration;

use secrecy::SecretString;
use tessera::config::{EmailSettings, EmailTransport};
use tessera::email::templates::{Template, Templates};
use tessera::email::{Mailer, Message, SendError};

use crate::helpers::test_settings;
use crate::smtp::{Options, SmtpServer};

fn settings(server: &SmtpServer) -> EmailSettings {
    let mut email = test_settings().email;
    email.transport = EmailTransport::Smtp;
    email.smtp_url = SecretString::from(server.url());
    email.smtp_ca_file = server.ca_file();
    email.smtp_timeout_secs = 5;
    email.from = "Tessera Test <no-reply@tessera.test>".into();
    email
}

fn verification(to: &str) -> Message {
    let rendered = Templates::load(None).unwrap().render(
        Template::VerifyEmail,
        &[
            ("email", to),
            (
                "link",
                "https://app.example/auth?action=verify_email&token=abc_DEF-123",
            ),
            ("expires_in", "24 hours"),
        ],
    );
    Message {
        to: to.into(),
        subject: rendered.subject,
        text: rendered.text,
        html: rendered.html,
    }
}

#[tokio::test]
async fn a_message_goes_out_over_starttls_with_auth_in_plain_text_and_html() {
    let server = SmtpServer::start(Options::default()).await;
    let mailer = Mailer::from_settings(&settings(&server)).unwrap();
    mailer
        .send(&verification("Ann <ann@example.com>"))
        .await
        .unwrap();

    let mail = server.wait_for(1, Duration::from_secs(5)).await.remove(0);
    assert_eq!(mail.header("X-Test-TLS").as_deref(), Some("yes"));
    assert_eq!(
        mail.header("X-Test-Envelope-To").as_deref(),
        Some("ann@example.com")
    );
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("Confirm your email address")
    );
    assert_eq!(
        mail.header("From").as_deref(),
        Some("\"Tessera Test\" <no-reply@tessera.test>")
    );
    assert!(
        mail.header("Content-Type")
            .is_some_and(|c| c.starts_with("multipart/alternative")),
        "{}",
        mail.raw
    );
    let body = mail.text();
    assert!(body.contains("Content-Type: text/plain"), "{body}");
    assert!(body.contains("Content-Type: text/html"), "{body}");
    // The link twice in HTML (button and copyable text), once in plain text.
    assert_eq!(
        body.matches("https://app.example/auth?action=verify_email&amp;token=abc_DEF-123")
            .count(),
        2,
        "{body}"
    );
    assert_eq!(
        body.matches("https://app.example/auth?action=verify_email&token=abc_DEF-123")
            .count(),
        1,
        "{body}"
    );
}

#[tokio::test]
async fn implicit_tls_works_with_an_smtps_url() {
    let server = SmtpServer::start(Options {
        implicit_tls: true,
        ..Options::default()
    })
    .await;
    assert!(server.url().starts_with("smtps://"));
    let mailer = Mailer::from_settings(&settings(&server)).unwrap();
    mailer.send(&verification("bo@example.com")).await.unwrap();
    let mail = server.wait_for(1, Duration::from_secs(5)).await.remove(0);
    assert_eq!(mail.header("X-Test-TLS").as_deref(), Some("yes"));
}

#[tokio::test]
async fn a_server_the_ca_file_does_not_vouch_for_gets_nothing() {
    let server = SmtpServer::start(Options::default()).await;
    let mut email = settings(&server);
    let other = std::env::temp_dir().join(format!("tessera-other-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&other, crate::smtp::certificates().0).unwrap();
    email.smtp_ca_file = other.clone();
    let mailer = Mailer::from_settings(&email).unwrap();
    let err = mailer
        .send(&verification("cy@example.com"))
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::Retry(_)), "{err}");
    // Not even the credentials went out: the error names no password.
    assert!(!err.to_string().contains("pass/word"), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.messages().is_empty());
    std::fs::remove_file(other).ok();
}

#[tokio::test]
async fn a_server_that_does_not_offer_starttls_gets_nothing() {
    let server = SmtpServer::start(Options {
        no_tls: true,
        ..Options::default()
    })
    .await;
    let mailer = Mailer::from_settings(&settings(&server)).unwrap();
    let err = mailer
        .send(&verification("di@example.com"))
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::Retry(_)), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn a_4xx_answer_is_worth_a_retry_and_a_5xx_is_not() {
    for (code, retry) in [("450", true), ("550", false)] {
        let server = SmtpServer::start(Options {
            refuse: Some(code),
            ..Options::default()
        })
        .await;
        let mailer = Mailer::from_settings(&settings(&server)).unwrap();
        let err = mailer
            .send(&verification("ed@example.com"))
            .await
            .unwrap_err();
        assert_eq!(matches!(err, SendError::Retry(_)), retry, "{code}: {err}");
        assert!(server.messages().is_empty());
    }
}

#[tokio::test]
async fn an_unreachable_server_is_worth_a_retry() {
    let mut server = SmtpServer::start(Options::default()).await;
    server.pause().await;
    let mailer = Mailer::from_settings(&settings(&server)).unwrap();
    let err = mailer
        .send(&verification("fa@example.com"))
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::Retry(_)), "{err}");
    server.resume().await;
    mailer.send(&verification("fa@example.com")).await.unwrap();
    server.wait_for(1, Duration::from_secs(5)).await;
}
