//! The Redis revocation denylist, shared by every instance.
//!
//! Two kinds of marks, each a single key that expires on its own when the last access
//! token it covers would have expired:
//! - `{prefix}revoked:sid:{session}`: every access token carrying that `sid` (one write
//!   per ended session, however many tokens were issued under it);
//! - `{prefix}revoked:jti:{jti}`: one access token.
//!
//! A check is one `EXISTS` of both keys: one round trip per request.

use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;
use crate::domain::SessionId;

#[derive(Clone)]
pub struct Denylist {
    conn: ConnectionManager,
    prefix: String,
}

impl Denylist {
    /// Connects lazily: the server starts while Redis is down; requests that need the
    /// denylist get 503 until it is back, and the manager reconnects by itself.
    pub fn connect_lazy(settings: &RedisSettings) -> anyhow::Result<Self> {
        let client = redis::Client::open(settings.url.expose_secret())
            .context("redis.url is not a valid Redis URL")?;
        let timeout = Duration::from_millis(settings.timeout_ms);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .context("cannot set up the Redis connection")?;
        Ok(Denylist {
            conn,
            prefix: settings.key_prefix.clone(),
        })
    }

    pub fn session_key(&self, sid: SessionId) -> String {
        format!("{}revoked:sid:{}", self.prefix, sid.0)
    }

    pub fn token_key(&self, jti: &str) -> String {
        format!("{}revoked:jti:{}", self.prefix, jti)
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Marks sessions revoked for `ttl` (the longest an access token can still live).
    pub async fn revoke_sessions(&self, sids: &[SessionId], ttl: Duration) -> anyhow::Result<()> {
        if sids.is_empty() {
            return Ok(());
        }
        let secs = ttl.as_secs().max(1);
        let mut pipe = redis::pipe();
        for sid in sids {
            pipe.set_ex(self.session_key(*sid), 1, secs).ignore();
        }
        let mut conn = self.conn.clone();
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Marks one access token revoked until it expires.
    pub async fn revoke_token(&self, jti: &str, ttl: Duration) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("SET")
            .arg(self.token_key(jti))
            .arg(1)
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// True when the token's session or the token itself is revoked.
    pub async fn is_revoked(&self, sid: SessionId, jti: &str) -> anyhow::Result<bool> {
        let mut conn = self.conn.clone();
        let hits: u32 = redis::cmd("EXISTS")
            .arg(self.session_key(sid))
            .arg(self.token_key(jti))
            .query_async(&mut conn)
            .await?;
        Ok(hits > 0)
    }
}
