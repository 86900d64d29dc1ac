//! Security events as webhooks (`[[events.webhooks]]`), received by an HTTP server the
//! test runs: Standard Webhooks signatures checked here with the test's own
//! HMAC-SHA256, subscriptions honoured, a receiver that is down or refusing gets every
//! event once it is back (across a restart of Tessera), and no request waits for a
//! delivery.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tessera::config::{Settings, WebhookSettings};

use crate::helpers::*;

/// The receivers' key: 32 bytes, as `whsec_` + base64 in the settings.
const KEY: [u8; 32] = *b"a webhook key of thirty-two byte";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Delivery {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
    /// Whether the receiver accepted it (2xx) or refused it (503).
    accepted: bool,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }

    fn kind(&self) -> String {
        self.json()["type"].as_str().unwrap().to_owned()
    }

    /// Checks the signature as a receiver must: HMAC-SHA256 over "id.timestamp.body".
    fn assert_signed(&self) {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&KEY).unwrap();
        mac.update(format!("{}.{}.{}", self.id, self.timestamp, self.body).as_bytes());
        let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        assert!(
            self.signature.split(' ').any(|s| s == expected),
            "bad signature {} on {self:?}",
            self.signature
        );
        let sent: i64 = self.timestamp.parse().unwrap();
        let now = chrono::Utc::now().timestamp();
        assert!((now - sent).abs() < 300, "timestamp {sent}, now {now}");
        assert!(self.id.starts_with("msg_"), "{}", self.id);
    }
}

#[derive(Default)]
struct Inbox {
    got: Mutex<Vec<Delivery>>,
    refusing: AtomicBool,
    /// While set, requests wait here without an answer.
    holding: AtomicBool,
    released: tokio::sync::Notify,
}

/// An HTTP server of the test's own that records what it receives, on a port it keeps
/// across a stop and a start.
struct Receiver {
    port: u16,
    inbox: Arc<Inbox>,
    server: Option<actix_web::dev::ServerHandle>,
}

async fn receive(req: HttpRequest, body: String, inbox: web::Data<Arc<Inbox>>) -> HttpResponse {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let accepted = !inbox.refusing.load(Ordering::SeqCst);
    inbox.got.lock().unwrap().push(Delivery {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        body,
        accepted,
    });
    while inbox.holding.load(Ordering::SeqCst) {
        let released = inbox.released.notified();
        if !inbox.holding.load(Ordering::SeqCst) {
            break;
        }
        released.await;
    }
    match accepted {
        true => HttpResponse::NoContent().finish(),
        false => HttpResponse::ServiceUnavailable().finish(),
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let mut receiver = Receiver {
            port: free_port(),
            inbox: Arc::default(),
            server: None,
        };
        receiver.resume();
        receiver
    }

    fn resume(&mut self) {
        let inbox = self.inbox.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(inbox.clone()))
                .route("/hook", web::post().to(receive))
        })
        .workers(1)
        .disable_signals()
        .bind(("127.0.0.1", self.port))
        .unwrap()
        .run();
        self.server = Some(server.handle());
        tokio::spawn(server);
    }

    async fn pause(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop(false).await;
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn webhook(&self, events: &[&str]) -> WebhookSettings {
        WebhookSettings {
            url: self.url(),
            secret: format!("whsec_{}", STANDARD.encode(KEY)).into(),
            events: events.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn got(&self) -> Vec<Delivery> {
        self.inbox.got.lock().unwrap().clone()
    }

    /// The accepted deliveries about `user`, in order.
    fn about(&self, user: &str) -> Vec<Delivery> {
        self.got()
            .into_iter()
            .filter(|d| d.accepted && d.json()["data"]["user_id"] == user)
            .collect()
    }

    async fn wait_for(&self, what: &str, user: &str, n: usize) -> Vec<Delivery> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.about(user).len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; got {:#?}",
                self.got()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.about(user)
    }
}

fn with_webhooks(webhooks: Vec<WebhookSettings>) -> Settings {
    let mut s = test_settings();
    s.events.webhooks = webhooks;
    s.events.retry_base_secs = 1;
    s.events.retry_max_secs = 1;
    s.events.timeout_secs = 5;
    s
}

#[tokio::test]
async fn security_events_reach_their_subscribers_signed() {
    let all = Receiver::start().await;
    let passwords = Receiver::start().await;
    let mut settings = with_webhooks(vec![
        all.webhook(&["*"]),
        passwords.webhook(&["password.changed"]),
    ]);
    // A second presentation of a rotated token is reuse at once.
    settings.tokens.refresh_reuse_grace_secs = 0;
    let app = spawn_app_with(settings).await;
    let admin = app.admin().await;

    let email = app.new_user().await;
    let user = app.user_id(&email).await.to_string();
    let first = app.login_ok(&email).await;
    // The device token of the first login: the second is from a known device.
    let device = first.body["device_token"].as_str().unwrap().to_owned();
    let res = app
        .post_json(
            "/login",
            &json!({"email": email, "password": PASSWORD, "device_token": device}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let second = Tokens::from_body(res.json().await.unwrap());
    let new_password = "another correct horse battery";
    let res = app
        .change_password(&second.access, PASSWORD, new_password)
        .await;
    assert!(res.status().is_success(), "{}", res.status());
    let third = app.login_ok_with(&email, new_password).await;
    app.refresh_ok(&third.refresh).await;
    assert_eq!(
        app.refresh(&third.refresh).await.status(),
        StatusCode::BAD_REQUEST
    );
    let res = app
        .call(
            Method::PATCH,
            &format!("/admin/users/{user}"),
            &admin.access,
            Some(&json!({"disabled": true, "roles": ["user", "editor"]})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);

    let expected = [
        "user.created",
        "session.created",
        "session.created",
        "password.changed",
        "session.created",
        "session.reuse_detected",
        "user.disabled",
        "user.roles_changed",
    ];
    let got = all
        .wait_for("every event of the user", &user, expected.len())
        .await;
    let kinds: Vec<String> = got.iter().map(Delivery::kind).collect();
    assert_eq!(kinds, expected);
    for d in &got {
        d.assert_signed();
        // Ids only: no address, password or token in any body.
        for secret in [
            email.as_str(),
            PASSWORD,
            new_password,
            &first.refresh,
            &device,
        ] {
            assert!(!d.body.contains(secret), "{}", d.body);
        }
    }
    let data: Vec<Value> = got.iter().map(|d| d.json()["data"].clone()).collect();
    assert_eq!(data[1]["new_device"], json!(true));
    assert_eq!(data[2]["new_device"], json!(false));
    assert_eq!(data[1]["session_id"], json!(first.session_id));
    assert_eq!(data[3]["how"], json!("changed"));
    assert_eq!(data[5]["session_id"], json!(third.session_id));
    assert_eq!(data[7]["roles"], json!(["editor", "user"]));
    assert_eq!(data[6]["actor_id"], admin.claims()["sub"]);
    let ids: std::collections::HashSet<_> = got.iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids.len(), got.len(), "webhook-id is unique per event");

    // The other receiver asked for password changes only.
    let only = passwords.wait_for("the password change", &user, 1).await;
    only[0].assert_signed();
    assert_eq!(only[0].kind(), "password.changed");
    assert!(
        passwords
            .got()
            .iter()
            .all(|d| d.kind() == "password.changed"),
        "{:?}",
        passwords.got()
    );
}

/// Outbox rows that were tried and are waiting for their next attempt (not claimed).
async fn tried_and_waiting(app: &TestApp, attempts: i64) -> i64 {
    let mut db = app.db().await;
    sqlx::query_scalar(app.pick(
        "SELECT COUNT(*) FROM outbox WHERE attempts >= $1 AND claimed_until IS NULL",
        "SELECT COUNT(*) FROM outbox WHERE attempts >= ?1 AND claimed_until IS NULL",
    ))
    .bind(attempts)
    .fetch_one(&mut db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_receiver_that_is_down_gets_every_event_after_it_is_back_even_across_a_restart() {
    let mut receiver = Receiver::start().await;
    let mut settings = with_webhooks(vec![receiver.webhook(&["user.created", "session.created"])]);
    // Attempts 5 s apart: the restart below happens between two of them. (A server
    // stopped in the middle of a batch leaves its rows claimed until their lease ends,
    // and in one test process a stopped server's tasks can hang on connections its
    // workers made; neither is what this test is about.)
    settings.events.retry_base_secs = 5;
    settings.events.retry_max_secs = 5;
    let app = spawn_app_with(settings.clone()).await;

    // Refusing (503): both events are tried, and stay.
    receiver.inbox.refusing.store(true, Ordering::SeqCst);
    let email = app.new_user().await;
    let user = app.user_id(&email).await.to_string();
    app.login_ok(&email).await;
    eventually("both events tried and waiting", || async {
        tried_and_waiting(&app, 1).await == 2
    })
    .await;
    // Down (nothing listens), and Tessera restarts while both wait in its outbox.
    receiver.pause().await;
    let app = restart(app, &settings).await;
    // The restarted server tries them against the closed port ...
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while tried_and_waiting(&app, 2).await < 2 {
        assert!(std::time::Instant::now() < deadline, "no second attempt");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // ... and delivers them once the receiver is back.
    receiver.inbox.refusing.store(false, Ordering::SeqCst);
    receiver.resume();
    let got = receiver.wait_for("both events", &user, 2).await;
    let kinds: Vec<String> = got.iter().map(Delivery::kind).collect();
    assert_eq!(kinds, ["user.created", "session.created"]);
    // The refused attempts were the same messages: same ids, same bytes.
    let refused: Vec<Delivery> = receiver.got().into_iter().filter(|d| !d.accepted).collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    for d in refused.iter().chain(&got) {
        d.assert_signed();
    }
    for d in &refused {
        let same = got
            .iter()
            .find(|g| g.id == d.id)
            .expect("delivered with the same id");
        assert_eq!(same.body, d.body);
    }
    eventually("the outbox is empty", || async {
        tried_and_waiting(&app, 0).await == 0
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn requests_are_answered_while_a_delivery_hangs() {
    let receiver = Receiver::start().await;
    let app = spawn_app_with(with_webhooks(vec![receiver.webhook(&["*"])])).await;
    // The receiver takes the first delivery and does not answer it.
    receiver.inbox.holding.store(true, Ordering::SeqCst);
    let email = app.new_user().await;
    let user = app.user_id(&email).await.to_string();
    eventually("the first delivery arrived", || async {
        receiver
            .got()
            .iter()
            .any(|d| d.json()["data"]["user_id"] == user)
    })
    .await;
    // While it hangs, logins (each an event) are answered.
    for _ in 0..3 {
        app.login_ok(&email).await;
    }
    assert_eq!(receiver.got().len(), 1, "the sender is still waiting");
    receiver.inbox.holding.store(false, Ordering::SeqCst);
    receiver.inbox.released.notify_waiters();
    let got = receiver.wait_for("every event", &user, 4).await;
    let kinds: Vec<String> = got.iter().map(Delivery::kind).collect();
    assert_eq!(
        kinds,
        [
            "user.created",
            "session.created",
            "session.created",
            "session.created"
        ]
    );
}

#[test]
fn webhook_settings_are_checked_at_start() {
    let load = |json: &str| {
        tessera::config::Settings::load_from(
            None,
            vec![("TESSERA__EVENTS__WEBHOOKS".to_owned(), json.to_owned())],
        )
    };
    let secret = format!("whsec_{}", STANDARD.encode(KEY));
    let ok = load(&format!(
        r#"[{{"url": "https://app.example.com/h", "secret": "{secret}", "events": ["*"]}}]"#
    ))
    .unwrap();
    assert_eq!(ok.events.webhooks.len(), 1);
    for (json, complaint) in [
        (
            format!(r#"[{{"url": "ftp://x", "secret": "{secret}", "events": ["*"]}}]"#),
            "url",
        ),
        (
            r#"[{"url": "https://x", "secret": "whsec_c2hvcnQ=", "events": ["*"]}]"#.into(),
            "secret",
        ),
        (
            format!(
                r#"[{{"url": "https://x", "secret": "{secret}", "events": ["user.created", "user.renamed"]}}]"#
            ),
            "unknown event \"user.renamed\"",
        ),
        ("not json".into(), "JSON list"),
    ] {
        let err = format!("{:#}", load(&json).unwrap_err());
        assert!(err.contains(complaint), "{json}: {err}");
    }
}
