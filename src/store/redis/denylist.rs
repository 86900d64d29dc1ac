//! The Redis revocation denylist, shared by every instance.
//!
//! Two kinds of marks, each a single key that expires on its own when the last access
//! token it covers would have expired:
//! - `{prefix}revoked:sid:{session}`: every access token carrying that `sid` (one write
//!   per ended session, however many tokens were issued under it);
//! - `{prefix}revoked:jti:{jti}`: one access token;
//! - `{prefix}revoked:user:{user}`: every access token of that user issued at or
//!   before the stored Unix time in milliseconds (a role change or disable: one write
//!   however many sessions the user has; tokens issued afterwards are unaffected).
//!
//! Every mark is also published on `{prefix}revocations` as `"<key without prefix>
//! <value> <ttl secs>"`, in the same pipeline as the write, so that copies of the
//! denylist in memory stay current without asking Redis per request: each instance's
//! own (`redis.local_copy`, [`Denylist::follow`]) and those of downstream APIs using
//! `tessera-verify`. Both are a [`tessera_marks::Feed`].
//!
//! A check asks the instance's copy once its freshness barrier has passed (the copy
//! then holds every mark whose write completed before the check began, on whichever
//! instance: see [`tessera_marks::Feed::barrier`]); while the copy is out of sync, or
//! without one, it is one `MGET` of the three keys. A token's
//! issue time in milliseconds comes from its `jti`, a UUIDv7 (see
//! [`crate::auth::access_token::Claims::issued_at_ms`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;
use tessera_marks::{AckRequest, Feed, FeedConfig, Source, Subject, instances_channel};

use super::measured::Measured;
use crate::config::{RedisSettings, read_ca_file};
use crate::domain::{SessionId, UserId};
use crate::store::{MarksHealth, Revocations};

/// SET KEYS[1] 1 EX ARGV[1] NX, and only if it was set, PUBLISH ARGV[2] ARGV[3] and the
/// ack request PUBLISH ARGV[4] ARGV[5], returning how many instances heard it; else -1.
const MARK_ONCE: &str = r"
if redis.call('SET', KEYS[1], '1', 'EX', tonumber(ARGV[1]), 'NX') then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return -1
";

#[derive(Clone)]
pub struct Denylist {
    conn: Measured,
    prefix: String,
    timeout: Duration,
    /// How long after a revocation another instance's copy may still answer without
    /// it: revocations wait for every instance's ack, or this long.
    lease: Duration,
    /// Replicas that must have a revocation before it is answered (`redis.wait_replicas`).
    wait_replicas: u32,
    /// The in-memory copy, once [`Denylist::follow`] started it.
    copy: Option<Arc<Feed>>,
}

/// Whether `e` is a failed TLS handshake (rustls names the certificate problem).
fn tls_failure(e: &redis::RedisError) -> bool {
    let text = format!("{e:?}");
    text.contains("certificate") || text.contains("InvalidCertificate") || text.contains("tls")
}

/// `redis.ca_file`'s certificates, when it is set.
fn ca_pem(settings: &RedisSettings) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(pem) = read_ca_file(&settings.ca_file, "redis.ca_file")? else {
        return Ok(None);
    };
    if !settings.url.expose_secret().starts_with("rediss://") {
        anyhow::bail!(
            "redis.ca_file is set but redis.url is not rediss://: set it to rediss://HOST:PORT"
        );
    }
    Ok(Some(pem))
}

impl Denylist {
    /// Connects lazily: the server starts while Redis is down; requests that need the
    /// denylist get 503 until it is back, and the manager reconnects by itself.
    pub fn connect_lazy(settings: &RedisSettings) -> anyhow::Result<Self> {
        let ca_pem = ca_pem(settings)?;
        let source = Source::parse(settings.url.expose_secret(), ca_pem.as_deref())
            .context("redis.url is not a valid Redis URL, or redis.ca_file does not go with it")?;
        let timeout = Duration::from_millis(settings.timeout_ms);
        let conn = match source {
            Source::Direct(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Measured::new(
                    ConnectionManager::new_lazy_with_config(*client, config)
                        .context("cannot set up the Redis connection")?,
                )
            }
            sentinel => Measured::primary_of(
                sentinel,
                redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout)),
            ),
        };
        Ok(Denylist {
            conn,
            prefix: settings.key_prefix.clone(),
            timeout,
            lease: Duration::from_millis(settings.local_copy_lease_ms),
            wait_replicas: settings.wait_replicas,
            copy: None,
        })
    }

    /// Starts the in-memory copy of the marks (needs a Tokio runtime); checks use it
    /// from its first sync on, and ask Redis until then.
    pub fn follow(&mut self, settings: &RedisSettings) -> anyhow::Result<()> {
        let feed = Feed::start(FeedConfig {
            redis_url: settings.url.expose_secret().to_owned(),
            ca_pem: ca_pem(settings)?,
            key_prefix: settings.key_prefix.clone(),
            // A silent subscription counts as lost within this (checks then ask Redis).
            max_unsynced: Duration::from_secs(5),
            lease: Some(self.lease),
        })
        .context("cannot start the revocation copy")?;
        self.copy = Some(feed);
        Ok(())
    }

    pub fn session_key(&self, sid: SessionId) -> String {
        format!("{}revoked:sid:{}", self.prefix, sid.0)
    }

    pub fn token_key(&self, jti: &str) -> String {
        format!("{}revoked:jti:{}", self.prefix, jti)
    }

    pub fn user_key(&self, user: UserId) -> String {
        format!("{}revoked:user:{}", self.prefix, user.0)
    }

    pub fn channel(&self) -> String {
        format!("{}revocations", self.prefix)
    }

    /// Adds "set `key` to `value` for `secs`, and tell subscribers" to `pipe`.
    fn mark(&self, pipe: &mut redis::Pipeline, key: String, value: impl ToString, secs: u64) {
        let value = value.to_string();
        let short = key.strip_prefix(&self.prefix).unwrap_or(&key).to_owned();
        pipe.set_ex(&key, &value, secs).ignore();
        pipe.publish(self.channel(), format!("{short} {value} {secs}"))
            .ignore();
    }

    /// Asks Redis once, at start. A TLS failure (an unknown CA, a certificate for
    /// another name) is a configuration error and stops the start with what to check;
    /// Redis merely down is not: requests that need it answer 503 until it is back.
    pub async fn check_at_start(&self) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(self.timeout * 2, ping.query_async::<String>(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if tls_failure(&e) => Err(anyhow::Error::new(e).context(
                "TLS with Redis failed: check redis.ca_file (the CA certificate that \
                 signed Redis's certificate) and that the certificate names the host in \
                 redis.url",
            )),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Redis does not answer at start; requests that need it answer 503 until it does");
                Ok(())
            }
            Err(_) => {
                tracing::warn!(
                    "Redis does not answer at start; requests that need it answer 503 until it does"
                );
                Ok(())
            }
        }
    }

    /// Times its commands into `metrics` (before [`Denylist::connection`] is shared).
    pub fn measured(&mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) {
        self.conn.reporting_to(metrics);
    }

    /// The shared connection, for other Redis-backed state (login failure counters).
    pub fn connection(&self) -> Measured {
        self.conn.clone()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Redis's `maxmemory-policy`, read from `INFO memory` (which managed services allow
    /// where `CONFIG` is renamed). Anything but `noeviction` lets Redis drop revocation
    /// marks (all of which have a TTL, so `volatile-*` policies pick exactly them) and
    /// failure counts when memory runs short: a revoked token would work again.
    /// `Ok(None)` when the server will not say (INFO renamed or answering without the
    /// field): it answered, so it is up, and the policy is the operator's to check.
    pub async fn eviction_policy(&self) -> anyhow::Result<Option<String>> {
        let mut conn = self.conn.clone();
        let info: Result<String, redis::RedisError> = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await;
        let info = match info {
            Ok(info) => info,
            // A command error is an answer: Redis is up but keeps INFO to itself.
            Err(e)
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("maxmemory_policy:"))
            .map(|p| p.trim().to_owned()))
    }

    /// Writes `pipe`'s marks followed by an ack request, then waits until every
    /// instance's copy holds them (see [`tessera_marks::Feed::settle`]): when this
    /// returns, no instance answers a check without them.
    async fn write_marks(&self, mut pipe: redis::Pipeline) -> anyhow::Result<()> {
        let request = self.copy.as_ref().map(|copy| copy.ack_request());
        pipe.publish(instances_channel(&self.prefix), ack_payload(&request));
        let mut conn = self.conn.clone();
        let (heard,): (i64,) = pipe.query_async(&mut conn).await?;
        self.replicated().await?;
        self.settle(request, heard).await;
        Ok(())
    }

    /// With `redis.wait_replicas` > 0: waits (at most `redis.timeout_ms`) until that
    /// many replicas have every write this connection made, else fails (503; the client
    /// retries, and marks are idempotent). So a revocation that was answered survives a
    /// failover to a replica.
    async fn replicated(&self) -> anyhow::Result<()> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let acked: i64 = redis::cmd("WAIT")
            .arg(self.wait_replicas)
            .arg(self.timeout.as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        if acked < self.wait_replicas as i64 {
            anyhow::bail!(
                "a revocation reached {acked} Redis replicas of the {} redis.wait_replicas asks",
                self.wait_replicas
            );
        }
        Ok(())
    }

    async fn settle(&self, request: Option<AckRequest<'_>>, heard: i64) {
        let heard = heard.max(0) as u64;
        match (&self.copy, request) {
            (Some(copy), Some(request)) => copy.settle(request, heard).await,
            // No copy here to receive acks: instances that keep one may answer from it
            // for up to a lease; wait that out.
            _ if heard > 0 => tokio::time::sleep(self.lease).await,
            _ => {}
        }
    }

    /// Sets `key` (and tells subscribers) only if it is absent; true if it was set.
    async fn mark_once(&self, key: String, ttl: Duration) -> anyhow::Result<bool> {
        let secs = ttl.as_secs().max(1);
        let short = key.strip_prefix(&self.prefix).unwrap_or(&key).to_owned();
        let request = self.copy.as_ref().map(|copy| copy.ack_request());
        let mut conn = self.conn.clone();
        let heard: i64 = redis::Script::new(MARK_ONCE)
            .key(&key)
            .arg(secs)
            .arg(self.channel())
            .arg(format!("{short} 1 {secs}"))
            .arg(instances_channel(&self.prefix))
            .arg(ack_payload(&request))
            .invoke_async(&mut conn)
            .await?;
        if heard < 0 {
            return Ok(false);
        }
        self.replicated().await?;
        self.settle(request, heard).await;
        Ok(true)
    }

    /// The check as one `MGET`, without the copy.
    async fn ask_redis(
        &self,
        sid: SessionId,
        jti: &str,
        user: UserId,
        issued_ms: i64,
    ) -> anyhow::Result<bool> {
        let mut conn = self.conn.clone();
        let (session, token, user_mark): (Option<String>, Option<String>, Option<i64>) =
            redis::cmd("MGET")
                .arg(self.session_key(sid))
                .arg(self.token_key(jti))
                .arg(self.user_key(user))
                .query_async(&mut conn)
                .await?;
        Ok(session.is_some() || token.is_some() || user_mark.is_some_and(|t| issued_ms <= t))
    }
}

#[async_trait::async_trait]
impl Revocations for Denylist {
    /// Marks sessions revoked for `ttl` (the longest an access token can still live).
    async fn revoke_sessions(&self, sids: &[SessionId], ttl: Duration) -> anyhow::Result<()> {
        if sids.is_empty() {
            return Ok(());
        }
        let secs = ttl.as_secs().max(1);
        let mut pipe = redis::pipe();
        for sid in sids {
            self.mark(&mut pipe, self.session_key(*sid), 1, secs);
        }
        self.write_marks(pipe).await
    }

    /// Marks one access token revoked until it expires. False when it already was
    /// (nothing is written or published again).
    async fn revoke_token(&self, jti: &str, ttl: Duration) -> anyhow::Result<bool> {
        self.mark_once(self.token_key(jti), ttl).await
    }

    /// Marks a session revoked for `ttl` unless its mark is already there: the repair of
    /// an earlier revocation whose Redis write failed, costing nothing when it did not.
    async fn ensure_session_revoked(&self, sid: SessionId, ttl: Duration) -> anyhow::Result<bool> {
        self.mark_once(self.session_key(sid), ttl).await
    }

    /// Revokes every access token of `user` issued at or before `at_ms` (Unix time in
    /// milliseconds), for `ttl` (the longest such a token can still live).
    async fn revoke_user_tokens(
        &self,
        user: UserId,
        at_ms: i64,
        ttl: Duration,
    ) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        self.mark(&mut pipe, self.user_key(user), at_ms, ttl.as_secs().max(1));
        self.write_marks(pipe).await
    }

    /// True when the token's session, the token itself, or every token of its user
    /// issued up to its issue time (`issued_ms`) is revoked: from the in-memory copy once
    /// it is known to be current, else from Redis.
    async fn is_revoked(
        &self,
        sid: SessionId,
        jti: &str,
        user: UserId,
        issued_ms: i64,
    ) -> anyhow::Result<bool> {
        if let Some(copy) = &self.copy
            && (copy.current() || copy.barrier(self.timeout).await)
        {
            return Ok(copy.revokes(&Subject {
                session: sid.0,
                jti,
                user: user.0,
                issued_ms,
            }));
        }
        self.ask_redis(sid, jti, user, issued_ms).await
    }

    async fn health(&self) -> anyhow::Result<MarksHealth> {
        Ok(match self.eviction_policy().await? {
            None => MarksHealth::Unknown,
            Some(policy) if policy == "noeviction" => MarksHealth::Ok,
            Some(policy) => MarksHealth::Unsafe(format!(
                "maxmemory-policy is {policy}: Redis may evict revocation marks; set noeviction"
            )),
        })
    }

    fn local_copy(&self) -> Option<&Feed> {
        self.copy.as_deref()
    }
}

/// The ack request's payload: where to send acks, or nowhere without a copy here.
fn ack_payload(request: &Option<AckRequest<'_>>) -> String {
    request
        .as_ref()
        .map_or_else(|| tessera_marks::NO_ACKS.to_owned(), |r| r.payload.clone())
}
