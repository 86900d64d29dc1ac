//! The periodic cleanup: deletes sessions (with their refresh tokens) that ended more
//! than `cleanup.session_retention_secs` ago, audit rows past their retention,
//! expired devices and revocation marks, emailed tokens expired more than
//! `cleanup.session_retention_secs` ago (used or not: until then a late use still
//! learns `used` or `expired`), and anonymous users never converted
//! (`cleanup.anonymous_retention_secs` after their last refresh).
//!
//! Work is done in batches of `cleanup.batch_size` rows, each its own short statement
//! with `SKIP LOCKED`, so the cleanup never holds locks for long, never blocks a refresh
//! and several instances can run it at once without waiting on each other.

use super::session::AuthService;
use crate::error::ApiError;
use crate::store::StoreError;

/// What one cleanup pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cleaned {
    pub sessions: u64,
    pub audit_events: u64,
    pub devices: u64,
    pub marks: u64,
    pub anonymous_users: u64,
    pub email_tokens: u64,
    pub mfa_challenges: u64,
}

impl AuthService {
    /// One pass: batches until a batch comes back short. Returns what was deleted.
    pub async fn cleanup(&self) -> Result<Cleaned, StoreError> {
        let c = &self.settings().cleanup;
        let batch = i64::from(c.batch_size);
        let idle = self.settings().tokens.refresh_idle_ttl_secs as i64;
        let store = &self.store;
        let audit_events = match c.audit_retention_secs {
            0 => 0,
            secs => in_batches(batch, || store.delete_old_audit(secs as i64, batch)).await?,
        };
        let done = Cleaned {
            sessions: in_batches(batch, || {
                store.delete_ended_sessions(idle, c.session_retention_secs as i64, batch)
            })
            .await?,
            audit_events,
            devices: in_batches(batch, || store.delete_expired_devices(batch)).await?,
            marks: in_batches(batch, || store.delete_expired_marks(batch)).await?,
            email_tokens: in_batches(batch, || {
                store.delete_old_email_tokens(c.session_retention_secs as i64, batch)
            })
            .await?,
            mfa_challenges: in_batches(batch, || store.delete_expired_mfa_challenges(batch))
                .await?,
            anonymous_users: self
                .delete_idle_anonymous(batch)
                .await
                .map_err(|e| match e {
                    ApiError::Unavailable(e, _) => StoreError::Unavailable(e),
                    other => StoreError::Other(anyhow::anyhow!("{other}")),
                })?,
        };
        if done != Cleaned::default() {
            tracing::info!(
                sessions = done.sessions,
                audit_events = done.audit_events,
                devices = done.devices,
                marks = done.marks,
                anonymous_users = done.anonymous_users,
                email_tokens = done.email_tokens,
                "cleanup deleted ended sessions, old audit rows, expired devices, marks and \
                 emailed tokens, and idle anonymous users"
            );
        }
        Ok(done)
    }
}

/// Runs `delete` (one batch of at most `batch` rows) until a batch comes back short,
/// yielding between batches; the rows deleted in all.
async fn in_batches<F, Fut>(batch: i64, mut delete: F) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0;
    loop {
        let n = delete().await?;
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}
