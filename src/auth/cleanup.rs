//! The periodic cleanup: deletes sessions (with their refresh tokens) that ended more
//! than `cleanup.session_retention_secs` ago, audit rows past their retention, and
//! expired devices and revocation marks.
//!
//! Work is done in batches of `cleanup.batch_size` rows, each its own short statement
//! with `SKIP LOCKED`, so the cleanup never holds locks for long, never blocks a refresh
//! and several instances can run it at once without waiting on each other.

use super::session::AuthService;
use crate::store::StoreError;

/// What one cleanup pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cleaned {
    pub sessions: u64,
    pub audit_events: u64,
    pub devices: u64,
    pub marks: u64,
}

impl AuthService {
    /// One pass: batches until a batch comes back short. Returns what was deleted.
    pub async fn cleanup(&self) -> Result<Cleaned, StoreError> {
        let c = &self.settings().cleanup;
        let batch = i64::from(c.batch_size);
        let idle = self.settings().tokens.refresh_idle_ttl_secs as i64;
        let mut done = Cleaned::default();
        loop {
            let n = self
                .store
                .delete_ended_sessions(idle, c.session_retention_secs as i64, batch)
                .await?;
            done.sessions += n;
            if n < batch as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        if c.audit_retention_secs > 0 {
            loop {
                let n = self
                    .store
                    .delete_old_audit(c.audit_retention_secs as i64, batch)
                    .await?;
                done.audit_events += n;
                if n < batch as u64 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        loop {
            let n = self.store.delete_expired_devices(batch).await?;
            done.devices += n;
            if n < batch as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        loop {
            let n = self.store.delete_expired_marks(batch).await?;
            done.marks += n;
            if n < batch as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        if done != Cleaned::default() {
            tracing::info!(
                sessions = done.sessions,
                audit_events = done.audit_events,
                devices = done.devices,
                marks = done.marks,
                "cleanup deleted ended sessions, old audit rows, expired devices and marks"
            );
        }
        Ok(done)
    }
}
