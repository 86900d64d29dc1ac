//! Security events as webhooks (`[[events.webhooks]]`), signed the Standard Webhooks
//! way, delivered through the outbox.
//!
//! An event is what an audit row records, told to the apps that subscribed: when
//! [`crate::auth`] writes an audit row whose kind is an event (see [`events_of`]), the
//! same transaction writes one outbox row per subscribed receiver ([`Webhooks::rows`]),
//! so a receiver hears of exactly the changes that are on the audit trail. The
//! request that caused it has already been answered by the time anything is sent:
//! the [`super::sender`] posts each row, retries with backoff while the receiver is
//! down or refuses (anything but 2xx), and gives up `events.give_up_after_secs` after
//! the event with a `webhook_delivery_failed` audit row.
//!
//! The body (`{"type", "timestamp", "data"}`) is fixed when the row is written, so a
//! repeat carries the same `webhook-id` and bytes; `webhook-timestamp` is the attempt's
//! and `webhook-signature` is `v1,` and the base64 of HMAC-SHA256 under the receiver's
//! secret over `"{id}.{timestamp}.{body}"`. Bodies hold ids, never an address, a token
//! or a secret.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use super::{Item, Outbox};
use crate::config::{EventSettings, WebhookSettings};
use crate::store::{AuditEvent, AuditKind};

/// An event and its data, before it is addressed to receivers.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: &'static str,
    pub data: Value,
}

/// The events an audit row reports (most rows report none).
pub fn events_of(audit: &AuditEvent<'_>) -> Vec<Event> {
    let Some(user) = audit.user_id else {
        return Vec::new();
    };
    let detail = &audit.detail;
    let mut data = json!({"user_id": user.0});
    if let Some(sid) = audit.session_id
        && !matches!(
            audit.kind,
            AuditKind::AdminUserUpdated | AuditKind::MfaResetByAdmin
        )
    {
        data["session_id"] = json!(sid.0);
    }
    if let Some(actor) = audit.actor_id {
        data["actor_id"] = json!(actor.0);
    }
    let one = |kind: &'static str, data: Value| vec![Event { kind, data }];
    match audit.kind {
        AuditKind::UserCreated => one("user.created", data),
        AuditKind::UserDeleted => one("user.deleted", data),
        AuditKind::LoginSucceeded => {
            data["new_device"] = json!(detail["new_device"].as_bool().unwrap_or(false));
            data["mfa"] = json!(detail["mfa"].as_bool().unwrap_or(false));
            one("session.created", data)
        }
        AuditKind::RefreshReuseDetected => one("session.reuse_detected", data),
        AuditKind::PasswordChanged => {
            data["how"] = json!("changed");
            one("password.changed", data)
        }
        AuditKind::PasswordReset => {
            data["how"] = json!("reset");
            one("password.changed", data)
        }
        AuditKind::EmailChanged => one("user.email_changed", data),
        AuditKind::MfaEnabled => one("mfa.enabled", data),
        AuditKind::MfaDisabled => one("mfa.disabled", data),
        AuditKind::MfaResetByAdmin => {
            data["how"] = json!("reset_by_admin");
            one("mfa.disabled", data)
        }
        AuditKind::AdminUserUpdated => {
            let mut events = Vec::new();
            match detail["disabled"].as_bool() {
                Some(true) => events.push(Event {
                    kind: "user.disabled",
                    data: data.clone(),
                }),
                Some(false) => events.push(Event {
                    kind: "user.enabled",
                    data: data.clone(),
                }),
                None => {}
            }
            if detail["roles_changed"].as_bool() == Some(true) {
                let mut data = data;
                data["roles"] = detail["roles"].clone();
                events.push(Event {
                    kind: "user.roles_changed",
                    data,
                });
            }
            events
        }
        _ => Vec::new(),
    }
}

/// The receivers and what each subscribed to.
pub struct Webhooks {
    receivers: Vec<Receiver>,
    client: reqwest::Client,
    /// Timeouts, retries and give-up (`[events]`), for the sender.
    pub settings: EventSettings,
}

struct Receiver {
    url: String,
    key: Vec<u8>,
    /// Empty: every event (`"*"`).
    events: BTreeSet<String>,
}

impl Default for Webhooks {
    /// No receivers: no event is written.
    fn default() -> Self {
        Webhooks {
            receivers: Vec::new(),
            client: reqwest::Client::new(),
            // Never read: with no receivers no row is written, so none is posted.
            settings: EventSettings {
                webhooks: Vec::new(),
                timeout_secs: 0,
                retry_base_secs: 0,
                retry_max_secs: 0,
                give_up_after_secs: 0,
            },
        }
    }
}

impl Webhooks {
    pub fn from_settings(settings: &EventSettings) -> anyhow::Result<Self> {
        let receivers = settings
            .webhooks
            .iter()
            .map(|w| {
                Ok(Receiver {
                    url: w.url.clone(),
                    key: secret_key(w)?,
                    events: w.events.iter().filter(|e| *e != "*").cloned().collect(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_secs.max(1)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Tessera-Webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot set up the webhook HTTP client")?;
        Ok(Webhooks {
            receivers,
            client,
            settings: settings.clone(),
        })
    }

    /// The outbox rows that tell `audit`'s events to their subscribers, sealed.
    pub fn rows(&self, outbox: &Outbox, audit: &AuditEvent<'_>) -> Vec<Vec<u8>> {
        if self.receivers.is_empty() {
            return Vec::new();
        }
        let now = Utc::now();
        let mut rows = Vec::new();
        for event in events_of(audit) {
            let body = body(&event, now);
            for receiver in &self.receivers {
                if receiver.events.is_empty() || receiver.events.contains(event.kind) {
                    rows.push(outbox.seal(&Item::Webhook {
                        url: receiver.url.clone(),
                        id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
                        event: event.kind.to_owned(),
                        body: body.clone(),
                    }));
                }
            }
        }
        rows
    }

    /// Posts one delivery now. `Ok` on a 2xx answer; `Err(why)` otherwise (retried
    /// by the sender); `None` when no receiver has this URL any more.
    pub async fn post(&self, url: &str, id: &str, body: &str) -> Option<Result<(), String>> {
        let receiver = self.receivers.iter().find(|r| r.url == url)?;
        let timestamp = Utc::now().timestamp();
        let answer = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature(&receiver.key, id, timestamp, body),
            )
            .body(body.to_owned())
            .send()
            .await;
        Some(match answer {
            Ok(res) if res.status().is_success() => Ok(()),
            Ok(res) => Err(format!("the receiver answered {}", res.status())),
            // Without the URL: it may hold a token of the receiver's.
            Err(e) if e.is_timeout() => Err("no answer within events.timeout_secs".into()),
            Err(e) if e.is_connect() => Err("cannot connect to the receiver".into()),
            Err(_) => Err("the request to the receiver failed".into()),
        })
    }
}

/// `{"type", "timestamp", "data"}` as Standard Webhooks suggests.
fn body(event: &Event, now: DateTime<Utc>) -> String {
    json!({
        "type": event.kind,
        "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "data": event.data,
    })
    .to_string()
}

/// The key bytes of a `whsec_...` secret.
fn secret_key(webhook: &WebhookSettings) -> anyhow::Result<Vec<u8>> {
    let secret = webhook.secret.expose_secret();
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    STANDARD.decode(encoded.trim()).ok().with_context(|| {
        format!(
            "events.webhooks: the secret for {} is not whsec_ and base64",
            host_of(&webhook.url)
        )
    })
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    let tag = aws_lc_rs::hmac::sign(&key, format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", STANDARD.encode(tag.as_ref()))
}

/// The host a delivery goes to, for logs and audit rows (a URL may hold a token).
pub fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{SessionId, UserId};
    use crate::store::ClientInfo;

    #[test]
    fn the_signature_is_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let key = STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn audit_rows_map_to_events_with_ids_only() {
        let client = ClientInfo::default();
        let user = UserId(uuid::Uuid::new_v4());
        let audit = |kind, detail| AuditEvent {
            kind,
            user_id: Some(user),
            session_id: Some(SessionId(uuid::Uuid::new_v4())),
            actor_id: None,
            client: &client,
            detail,
        };
        let login = events_of(&audit(
            AuditKind::LoginSucceeded,
            json!({"new_device": true}),
        ));
        assert_eq!(login[0].kind, "session.created");
        assert_eq!(login[0].data["new_device"], json!(true));
        let update = events_of(&audit(
            AuditKind::AdminUserUpdated,
            json!({"disabled": true, "roles": ["admin"], "roles_changed": true}),
        ));
        let kinds: Vec<_> = update.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["user.disabled", "user.roles_changed"]);
        assert_eq!(update[1].data["roles"], json!(["admin"]));
        assert!(update[0].data.get("session_id").is_none());
        assert!(events_of(&audit(AuditKind::LoginFailed, json!({}))).is_empty());
        assert!(events_of(&audit(AuditKind::Refresh, json!({}))).is_empty());
    }
}
