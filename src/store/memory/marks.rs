//! Revocation marks held in the process ([`tessera_marks::Marks`], the structure the
//! Redis copies use), with the same kinds and lifetimes as [`crate::store::redis::denylist`].
//!
//! Durable through the database ([`MemoryMarks::persistent`]): per-user cut-offs and
//! single access tokens are saved (`revocation_marks`) before they count, ended
//! sessions are in `sessions.revoked_at` already, and [`MemoryMarks::load`] reads both
//! back on start, so a restart never brings a revoked access token back. The saved ones
//! are read again every second ([`MemoryMarks::sync`]): the command line, another
//! process, revokes this way (`tessera user delete` on the embedded database).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tessera_marks::{Marks, Subject};

use crate::domain::{SessionId, UserId};
use crate::store::{MarksHealth, Revocations, Store};

/// Expired marks are dropped at most this often (on a write).
const PRUNE_EVERY: Duration = Duration::from_secs(30);

pub struct MemoryMarks {
    state: RwLock<(Marks, Instant)>,
    /// Where marks the database does not otherwise hold are saved (`None`: nowhere,
    /// for tests of the structure alone).
    store: Option<Arc<dyn Store>>,
    /// Whether the saved marks have been read back: until then no check can be
    /// answered (a restart must not bring a revoked token back, even for a moment).
    loaded: AtomicBool,
}

impl Default for MemoryMarks {
    fn default() -> Self {
        MemoryMarks {
            state: RwLock::new((Marks::default(), Instant::now())),
            store: None,
            loaded: AtomicBool::new(true),
        }
    }
}

impl MemoryMarks {
    /// Marks that survive a restart through `store`; call [`MemoryMarks::load`] before
    /// serving.
    pub fn persistent(store: Arc<dyn Store>) -> Self {
        MemoryMarks {
            store: Some(store),
            loaded: AtomicBool::new(false),
            ..MemoryMarks::default()
        }
    }

    /// Whether [`MemoryMarks::load`] has succeeded (always, without a store).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Reads every live mark back from the database (`session_mark_secs`: how long a
    /// session's mark lives after the session ended). Returns how many.
    pub async fn load(&self, session_mark_secs: u64) -> anyhow::Result<usize> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let saved = store.live_marks(session_mark_secs as i64).await?;
        let now = chrono::Utc::now();
        for mark in &saved {
            let left = (mark.expires_at - now).to_std().unwrap_or_default();
            if !left.is_zero() {
                self.mark(&mark.key, &mark.value.to_string(), left);
            }
        }
        self.loaded.store(true, Ordering::Release);
        Ok(saved.len())
    }

    /// Applies the marks saved in the database since they were read (those another
    /// process saved: `tessera user delete` on the embedded database), so that they
    /// count here too. Returns how many were saved in all.
    pub async fn sync(&self) -> anyhow::Result<usize> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        // Sessions ended zero seconds ago: none; only the saved marks.
        let saved = store.live_marks(0).await?;
        let now = chrono::Utc::now();
        for mark in &saved {
            let left = (mark.expires_at - now).to_std().unwrap_or_default();
            if !left.is_zero() {
                self.mark(&mark.key, &mark.value.to_string(), left);
            }
        }
        Ok(saved.len())
    }

    /// Saves a mark the database does not otherwise hold; true if it was new there.
    async fn save(&self, key: &str, value: i64, ttl: Duration) -> anyhow::Result<Option<bool>> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let expires_at =
            chrono::Utc::now() + chrono::Duration::from_std(ttl.max(Duration::from_secs(1)))?;
        Ok(Some(store.save_mark(key, value, expires_at).await?))
    }

    /// Applies one mark (`revoked:<kind>:<id>`, its value, its lifetime); true if it
    /// was not there already.
    fn mark(&self, key: &str, value: &str, ttl: Duration) -> bool {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let (marks, pruned) = &mut *state;
        let now = Instant::now();
        if now.duration_since(*pruned) > PRUNE_EVERY {
            marks.prune(now);
            *pruned = now;
        }
        let before = marks.len();
        marks.apply(key, value, ttl.max(Duration::from_secs(1)));
        marks.len() > before
    }

    fn revokes(&self, subject: &Subject<'_>) -> bool {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.0.revokes(subject, Instant::now())
    }

    /// Whether a session mark is live (for `ensure_session_revoked`).
    fn session_marked(&self, sid: SessionId) -> bool {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.0.revokes_session(sid.0, Instant::now())
    }
}

#[async_trait::async_trait]
impl Revocations for MemoryMarks {
    async fn revoke_sessions(&self, sids: &[SessionId], ttl: Duration) -> anyhow::Result<()> {
        for sid in sids {
            self.mark(&format!("revoked:sid:{}", sid.0), "1", ttl);
        }
        Ok(())
    }

    async fn revoke_token(&self, jti: &str, ttl: Duration) -> anyhow::Result<bool> {
        let key = format!("revoked:jti:{jti}");
        let saved_new = self.save(&key, 1, ttl).await?;
        let new_here = self.mark(&key, "1", ttl);
        Ok(saved_new.unwrap_or(new_here))
    }

    async fn ensure_session_revoked(&self, sid: SessionId, ttl: Duration) -> anyhow::Result<bool> {
        if self.session_marked(sid) {
            return Ok(false);
        }
        Ok(self.mark(&format!("revoked:sid:{}", sid.0), "1", ttl))
    }

    async fn revoke_user_tokens(
        &self,
        user: UserId,
        at_ms: i64,
        ttl: Duration,
    ) -> anyhow::Result<()> {
        let key = format!("revoked:user:{}", user.0);
        self.save(&key, at_ms, ttl).await?;
        self.mark(&key, &at_ms.to_string(), ttl);
        Ok(())
    }

    async fn is_revoked(
        &self,
        sid: SessionId,
        jti: &str,
        user: UserId,
        issued_ms: i64,
    ) -> anyhow::Result<bool> {
        anyhow::ensure!(
            self.is_loaded(),
            "the revocation marks have not been read back from the database yet"
        );
        Ok(self.revokes(&Subject {
            session: sid.0,
            jti,
            user: user.0,
            issued_ms,
        }))
    }

    async fn health(&self) -> anyhow::Result<MarksHealth> {
        Ok(MarksHealth::Ok)
    }

    fn in_process(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[tokio::test]
    async fn the_three_kinds_of_marks_revoke_what_they_cover_and_expire() {
        let marks = MemoryMarks::default();
        let (sid, user) = (SessionId(Uuid::new_v4()), UserId(Uuid::new_v4()));
        let other = SessionId(Uuid::new_v4());
        let minute = Duration::from_secs(60);
        assert!(!marks.is_revoked(sid, "j1", user, 1000).await.unwrap());

        marks.revoke_sessions(&[sid], minute).await.unwrap();
        assert!(marks.is_revoked(sid, "j1", user, 1000).await.unwrap());
        assert!(!marks.is_revoked(other, "j1", user, 1000).await.unwrap());
        assert!(!marks.ensure_session_revoked(sid, minute).await.unwrap());
        assert!(marks.ensure_session_revoked(other, minute).await.unwrap());

        let third = SessionId(Uuid::new_v4());
        assert!(marks.revoke_token("j3", minute).await.unwrap());
        assert!(
            !marks.revoke_token("j3", minute).await.unwrap(),
            "already there"
        );
        assert!(marks.is_revoked(third, "j3", user, 1000).await.unwrap());
        assert!(!marks.is_revoked(third, "j4", user, 1000).await.unwrap());

        marks.revoke_user_tokens(user, 1000, minute).await.unwrap();
        assert!(marks.is_revoked(third, "j4", user, 1000).await.unwrap());
        assert!(!marks.is_revoked(third, "j4", user, 1001).await.unwrap());

        // A one-second mark stops counting after its second.
        let brief = SessionId(Uuid::new_v4());
        marks
            .revoke_sessions(&[brief], Duration::from_millis(1))
            .await
            .unwrap();
        assert!(marks.is_revoked(brief, "x", user, 5000).await.unwrap());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(!marks.is_revoked(brief, "x", user, 5000).await.unwrap());
    }
}
