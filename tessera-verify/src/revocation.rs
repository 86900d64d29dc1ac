//! Revocation at local speed: an in-memory copy of the server's Redis denylist.
//!
//! The copy is a [`tessera_marks::Feed`]: it subscribes to the server's
//! `{prefix}revocations` channel, loads every existing mark with `SCAN`, applies each
//! message from then on, and pings its subscription every `max_unsynced / 4` so that a
//! connection that died silently counts as lost. A check is a hash-map lookup, no round
//! trip.
//!
//! While the copy has been out of touch with Redis for longer than `max_unsynced`,
//! checks fail with `RevocationUnavailable` (fail-closed, the default) or accept on the
//! last known set (fail-open). Before the first sync a fail-closed verifier refuses
//! every token.

use std::sync::Arc;
use std::time::Duration;

use tessera_marks::{Feed, FeedConfig, Subject};

use crate::{Claims, VerifyError};

#[derive(Debug, Clone)]
pub struct RevocationConfig {
    pub redis_url: String,
    /// PEM CA certificates for a `rediss://` URL, instead of the system's roots (as the
    /// server's `redis.ca_file`). With TLS, install a rustls crypto provider first if
    /// the program has more than one.
    pub redis_ca_pem: Option<Vec<u8>>,
    /// The server's `redis.key_prefix`.
    pub key_prefix: String,
    /// How long the set may be out of touch with Redis before the policy applies.
    pub max_unsynced: Duration,
    /// Accept tokens on the last known set when out of touch for longer (true), or
    /// refuse them with `RevocationUnavailable` (false, the default).
    pub fail_open: bool,
}

impl RevocationConfig {
    pub fn new(redis_url: impl Into<String>, key_prefix: impl Into<String>) -> Self {
        RevocationConfig {
            redis_url: redis_url.into(),
            redis_ca_pem: None,
            key_prefix: key_prefix.into(),
            max_unsynced: Duration::from_secs(5),
            fail_open: false,
        }
    }
}

pub(crate) struct Revocations {
    feed: Arc<Feed>,
    max_unsynced: Duration,
    fail_open: bool,
}

impl Revocations {
    pub fn start(config: RevocationConfig) -> Result<Arc<Self>, VerifyError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(VerifyError::Config(
                "revocation needs a Tokio runtime to run its subscriber".into(),
            ));
        }
        let feed = Feed::start(FeedConfig {
            redis_url: config.redis_url,
            ca_pem: config.redis_ca_pem,
            key_prefix: config.key_prefix,
            max_unsynced: config.max_unsynced,
            // Downstream APIs neither acknowledge revocations nor wait for acks.
            lease: None,
        })
        .map_err(|e| VerifyError::Config(format!("redis_url: {e}")))?;
        Ok(Arc::new(Revocations {
            feed,
            max_unsynced: config.max_unsynced,
            fail_open: config.fail_open,
        }))
    }

    pub fn check(&self, claims: &Claims) -> Result<(), VerifyError> {
        if let Some((since, ever_synced)) = self.feed.unsynced() {
            let too_long = !ever_synced || since.elapsed() > self.max_unsynced;
            if too_long && !self.fail_open {
                return Err(VerifyError::RevocationUnavailable);
            }
        }
        let subject = Subject {
            session: claims.sid,
            jti: &claims.jti,
            user: claims.sub,
            issued_ms: claims.issued_at_ms(),
        };
        if self.feed.revokes(&subject) {
            return Err(VerifyError::Revoked);
        }
        Ok(())
    }

    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        self.feed.wait_synced(timeout).await
    }
}
