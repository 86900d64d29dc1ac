//! Each instance's outbox sender: claims due rows (a lease, so a row is worked on by one
//! sender at a time and a dead sender's rows go to another after it), delivers them
//! (emails through the mailer, webhooks posted: [`super::webhook`]), and deletes each
//! once delivered. A failure that may pass is retried with exponential backoff
//! (`email.retry_base_secs` doubling up to `email.retry_max_secs`; `events.*` for
//! webhooks); a row still undelivered `give_up_after_secs` after it was written, or
//! refused for good, is deleted with an `email_delivery_failed` /
//! `webhook_delivery_failed` audit row. Nothing here runs in a request:
//! requests only write rows and wake the sender.
//!
//! At least once: a sender that dies between delivering and deleting leaves the row to
//! be delivered again after its lease.

use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use std::collections::BTreeMap;

use super::webhook::{Webhooks, host_of};
use super::{Item, Outbox};
use crate::config::EmailSettings;
use crate::domain::UserId;
use crate::email::templates::{Template, Templates};
use crate::email::{Mailer, Message, SendError};
use crate::store::{AuditEvent, AuditKind, ClientInfo, OutboxRow, Store, StoreResult};

/// Rows claimed at a time.
const BATCH: i64 = 8;
/// How often the sender looks for due rows when nothing woke it (rows written by other
/// instances, retries coming due).
const POLL: Duration = Duration::from_secs(1);

pub struct Sender {
    /// Weak: the sender ends once the application that owns the store is gone, and never
    /// keeps the database (an embedded one's single-instance claim) past it.
    store: Weak<dyn Store>,
    outbox: Arc<Outbox>,
    mailer: Mailer,
    templates: Templates,
    settings: EmailSettings,
    webhooks: Arc<Webhooks>,
}

impl Sender {
    pub fn new(
        store: &Arc<dyn Store>,
        outbox: Arc<Outbox>,
        mailer: Mailer,
        templates: Templates,
        settings: EmailSettings,
        webhooks: Arc<Webhooks>,
    ) -> Self {
        Sender {
            store: Arc::downgrade(store),
            outbox,
            mailer,
            templates,
            settings,
            webhooks,
        }
    }

    /// Delivers until the store is gone.
    pub async fn run(self) {
        let wake = self.outbox.wakeup();
        loop {
            let Some(store) = self.store.upgrade() else {
                return;
            };
            let claimed = match self.pass(&*store).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox: cannot claim rows; will retry");
                    0
                }
            };
            drop(store);
            if claimed < BATCH as usize {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        }
    }

    /// Claims and works on one batch; how many rows it claimed.
    async fn pass(&self, store: &dyn Store) -> StoreResult<usize> {
        let rows = store.claim_outbox(BATCH, self.lease_secs()).await?;
        let n = rows.len();
        for row in rows {
            if let Err(e) = self.deliver(store, row).await {
                // The row stays claimed until its lease ends, then comes again.
                tracing::warn!(error = %e, "outbox: cannot record a delivery; will retry");
            }
        }
        Ok(n)
    }

    /// Longer than a batch can take: every message of it timing out at every step.
    fn lease_secs(&self) -> i64 {
        let slowest = self
            .settings
            .smtp_timeout_secs
            .max(self.webhooks.settings.timeout_secs)
            .max(1);
        (BATCH as u64 * slowest * 4).max(120) as i64
    }

    async fn deliver(&self, store: &dyn Store, row: OutboxRow) -> StoreResult<()> {
        let Some(item) = self.outbox.open(&row.payload) else {
            let failed = match row.kind.as_str() {
                "webhook" => AuditKind::WebhookDeliveryFailed,
                _ => AuditKind::EmailDeliveryFailed,
            };
            let detail = json!({"reason": "undecryptable", "attempts": row.attempts});
            tracing::error!(
                id = row.id,
                "outbox row undecryptable: keys.dir/outbox.secret changed"
            );
            return self.abandon(store, &row, failed, None, detail).await;
        };
        match item {
            Item::Email {
                user,
                template,
                to,
                values,
            } => {
                self.send_email(store, row, user, template, to, values)
                    .await
            }
            Item::Webhook {
                url,
                id,
                event,
                body,
            } => self.post_webhook(store, row, url, id, event, body).await,
        }
    }

    async fn send_email(
        &self,
        store: &dyn Store,
        row: OutboxRow,
        user: Option<UserId>,
        template: String,
        to: String,
        values: BTreeMap<String, String>,
    ) -> StoreResult<()> {
        let give_up = |reason: &str, why: &str| {
            tracing::error!(
                id = row.id,
                attempts = row.attempts,
                template,
                reason,
                error = %why,
                "email given up on"
            );
            let detail = json!({
                "template": template,
                "reason": reason,
                "attempts": row.attempts,
            });
            self.abandon(store, &row, AuditKind::EmailDeliveryFailed, user, detail)
        };
        let Some(kind) = Template::from_name(&template) else {
            return give_up("unknown_template", "written by a newer version").await;
        };
        let values: Vec<(&str, &str)> = values
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let rendered = self.templates.render(kind, &values);
        let message = Message {
            to,
            subject: rendered.subject,
            text: rendered.text,
            html: rendered.html,
        };
        match self.mailer.send(&message).await {
            Ok(()) => {
                tracing::info!(id = row.id, template, attempts = row.attempts, "email sent");
                store.delete_outbox(row.id).await
            }
            Err(SendError::Retry(why)) if !too_old(&row, self.settings.give_up_after_secs) => {
                let after = backoff_secs(
                    row.attempts,
                    self.settings.retry_base_secs,
                    self.settings.retry_max_secs,
                );
                tracing::warn!(
                    id = row.id,
                    template,
                    attempts = row.attempts,
                    retry_in_secs = after,
                    error = %why,
                    "email not delivered yet"
                );
                store.retry_outbox(row.id, after).await
            }
            Err(SendError::Retry(why)) => give_up("gave_up", &why).await,
            Err(SendError::Permanent(why)) => give_up("refused", &why).await,
        }
    }

    async fn post_webhook(
        &self,
        store: &dyn Store,
        row: OutboxRow,
        url: String,
        id: String,
        event: String,
        body: String,
    ) -> StoreResult<()> {
        let host = host_of(&url);
        let give_up = |reason: &str, why: &str| {
            tracing::error!(
                id = row.id,
                attempts = row.attempts,
                event,
                host,
                reason,
                error = %why,
                "webhook given up on"
            );
            let detail = json!({
                "event": event,
                "host": host,
                "reason": reason,
                "attempts": row.attempts,
            });
            self.abandon(store, &row, AuditKind::WebhookDeliveryFailed, None, detail)
        };
        let events = &self.webhooks.settings;
        match self.webhooks.post(&url, &id, &body).await {
            None => {
                give_up(
                    "receiver_removed",
                    "no [[events.webhooks]] has this url now",
                )
                .await
            }
            Some(Ok(())) => {
                tracing::info!(
                    id = row.id,
                    event,
                    host,
                    attempts = row.attempts,
                    "webhook delivered"
                );
                store.delete_outbox(row.id).await
            }
            Some(Err(why)) if !too_old(&row, events.give_up_after_secs) => {
                let after =
                    backoff_secs(row.attempts, events.retry_base_secs, events.retry_max_secs);
                tracing::warn!(
                    id = row.id,
                    event,
                    host,
                    attempts = row.attempts,
                    retry_in_secs = after,
                    error = %why,
                    "webhook not delivered yet"
                );
                store.retry_outbox(row.id, after).await
            }
            Some(Err(why)) => give_up("gave_up", &why).await,
        }
    }

    async fn abandon(
        &self,
        store: &dyn Store,
        row: &OutboxRow,
        kind: AuditKind,
        user: Option<UserId>,
        detail: serde_json::Value,
    ) -> StoreResult<()> {
        store
            .abandon_outbox(
                row.id,
                AuditEvent {
                    kind,
                    user_id: user,
                    session_id: None,
                    actor_id: None,
                    client: &ClientInfo::default(),
                    detail,
                },
            )
            .await
    }
}

/// Whether `row` was written at least `give_up_after_secs` ago.
fn too_old(row: &OutboxRow, give_up_after_secs: u64) -> bool {
    let age = Utc::now() - row.created_at;
    age.num_seconds() >= give_up_after_secs as i64
}

/// base × 2^(attempts − 1), at most `max`.
fn backoff_secs(attempts: i32, base: u64, max: u64) -> i64 {
    let base = base.max(1);
    let doublings = attempts.saturating_sub(1).clamp(0, 20) as u32;
    base.saturating_mul(1 << doublings).min(max.max(base)) as i64
}
