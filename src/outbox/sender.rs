//! Each instance's outbox sender: claims due rows (a lease, so a row is worked on by one
//! sender at a time and a dead sender's rows go to another after it), delivers them, and
//! deletes each once delivered. A failure that may pass is retried with exponential
//! backoff (`email.retry_base_secs` doubling up to `email.retry_max_secs`); a row still
//! undelivered `email.give_up_after_secs` after it was written, or refused for good, is
//! deleted with an `email_delivery_failed` audit row. Nothing here runs in a request:
//! requests only write rows and wake the sender.
//!
//! At least once: a sender that dies between delivering and deleting leaves the row to
//! be delivered again after its lease.

use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use super::{Item, Outbox};
use crate::config::EmailSettings;
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
}

impl Sender {
    pub fn new(
        store: &Arc<dyn Store>,
        outbox: Arc<Outbox>,
        mailer: Mailer,
        templates: Templates,
        settings: EmailSettings,
    ) -> Self {
        Sender {
            store: Arc::downgrade(store),
            outbox,
            mailer,
            templates,
            settings,
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
        (BATCH as u64 * self.settings.smtp_timeout_secs.max(1) * 4).max(120) as i64
    }

    async fn deliver(&self, store: &dyn Store, row: OutboxRow) -> StoreResult<()> {
        let Some(item) = self.outbox.open(&row.payload) else {
            return self
                .give_up(
                    store,
                    &row,
                    None,
                    "undecryptable",
                    "keys.dir/outbox.secret changed",
                )
                .await;
        };
        let Item::Email {
            user,
            template,
            to,
            values,
        } = &item;
        let Some(kind) = Template::from_name(template) else {
            return self
                .give_up(
                    store,
                    &row,
                    *user,
                    "unknown_template",
                    "written by a newer version",
                )
                .await;
        };
        let values: Vec<(&str, &str)> = values
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let rendered = self.templates.render(kind, &values);
        let message = Message {
            to: to.clone(),
            subject: rendered.subject,
            text: rendered.text,
            html: rendered.html,
        };
        match self.mailer.send(&message).await {
            Ok(()) => {
                tracing::info!(id = row.id, template, attempts = row.attempts, "email sent");
                store.delete_outbox(row.id).await
            }
            Err(SendError::Retry(why)) if !self.too_old(&row) => {
                let after = self.backoff_secs(row.attempts);
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
            Err(SendError::Retry(why)) => self.give_up(store, &row, *user, "gave_up", &why).await,
            Err(SendError::Permanent(why)) => {
                self.give_up(store, &row, *user, "refused", &why).await
            }
        }
    }

    fn too_old(&self, row: &OutboxRow) -> bool {
        let age = Utc::now() - row.created_at;
        age.num_seconds() >= self.settings.give_up_after_secs as i64
    }

    /// base × 2^(attempts − 1), at most the maximum.
    fn backoff_secs(&self, attempts: i32) -> i64 {
        let base = self.settings.retry_base_secs.max(1);
        let doublings = attempts.saturating_sub(1).clamp(0, 20) as u32;
        base.saturating_mul(1 << doublings)
            .min(self.settings.retry_max_secs.max(base)) as i64
    }

    async fn give_up(
        &self,
        store: &dyn Store,
        row: &OutboxRow,
        user: Option<crate::domain::UserId>,
        reason: &str,
        why: &str,
    ) -> StoreResult<()> {
        tracing::error!(
            id = row.id,
            attempts = row.attempts,
            reason,
            error = %why,
            "email given up on"
        );
        let template = self
            .outbox
            .open(&row.payload)
            .map(|Item::Email { template, .. }| template);
        store
            .abandon_outbox(
                row.id,
                AuditEvent {
                    kind: AuditKind::EmailDeliveryFailed,
                    user_id: user,
                    session_id: None,
                    actor_id: None,
                    client: &ClientInfo::default(),
                    detail: json!({
                        "template": template,
                        "reason": reason,
                        "attempts": row.attempts,
                    }),
                },
            )
            .await
    }
}
