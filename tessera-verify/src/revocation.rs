//! Revocation at local speed: an in-memory copy of the server's Redis denylist.
//!
//! The server writes each revocation as a key that expires on its own
//! (`{prefix}revoked:sid:<session>`, `{prefix}revoked:jti:<jti>`,
//! `{prefix}revoked:user:<user>` = ms) and publishes the same key, value and TTL on the
//! channel `{prefix}revocations`. This module subscribes, then loads every existing
//! key with `SCAN` (subscribing first, so nothing published during the scan is lost),
//! and from then on applies each message: a check is a hash-map lookup, no round trip.
//!
//! When the subscription drops, the set is no longer known to be current: the task
//! reconnects with backoff and resyncs in full. A connection can also die silently (a
//! NAT or firewall forgetting it, a network that stops forwarding): the subscription
//! then looks alive and hears nothing. So the task pings Redis on the subscription
//! connection every `max_unsynced / 4` and gives each ping as long again to answer; a
//! ping that fails or stays unanswered counts as a lost feed, out of touch since the
//! last answer, so the policy below applies within `max_unsynced` of the silence. While unsynced for longer than
//! `max_unsynced`, checks fail with `RevocationUnavailable` (fail-closed, the default)
//! or accept on the last known set (fail-open). Before the first sync a fail-closed
//! verifier refuses every token.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use uuid::Uuid;

use crate::{Claims, VerifyError};

#[derive(Debug, Clone)]
pub struct RevocationConfig {
    pub redis_url: String,
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
            key_prefix: key_prefix.into(),
            max_unsynced: Duration::from_secs(5),
            fail_open: false,
        }
    }
}

#[derive(Default)]
struct Set {
    sessions: HashMap<Uuid, Instant>,
    tokens: HashMap<String, Instant>,
    /// Tokens of the user issued at or before the ms value are revoked.
    users: HashMap<Uuid, (i64, Instant)>,
}

impl Set {
    /// Applies one `revoked:*` key with its value and remaining lifetime.
    fn apply(&mut self, key: &str, value: &str, ttl: Duration) {
        let until = Instant::now() + ttl;
        if let Some(sid) = key.strip_prefix("revoked:sid:") {
            if let Ok(sid) = Uuid::parse_str(sid) {
                self.sessions.insert(sid, until);
            }
        } else if let Some(jti) = key.strip_prefix("revoked:jti:") {
            self.tokens.insert(jti.to_owned(), until);
        } else if let Some(user) = key.strip_prefix("revoked:user:")
            && let (Ok(user), Ok(at)) = (Uuid::parse_str(user), value.parse::<i64>())
        {
            let entry = self.users.entry(user).or_insert((at, until));
            if at >= entry.0 {
                *entry = (at, until);
            }
        }
    }

    fn revokes(&self, claims: &Claims, now: Instant) -> bool {
        let live = |until: &Instant| *until > now;
        self.sessions.get(&claims.sid).is_some_and(live)
            || self.tokens.get(&claims.jti).is_some_and(live)
            || self
                .users
                .get(&claims.sub)
                .is_some_and(|(at, until)| live(until) && claims.issued_at_ms() <= *at)
    }

    fn prune(&mut self, now: Instant) {
        self.sessions.retain(|_, until| *until > now);
        self.tokens.retain(|_, until| *until > now);
        self.users.retain(|_, (_, until)| *until > now);
    }
}

struct State {
    set: Set,
    /// `None` while in sync; else since when it is not (process start before the first sync).
    unsynced_since: Option<Instant>,
    ever_synced: bool,
}

pub(crate) struct Revocations {
    config: RevocationConfig,
    state: RwLock<State>,
    synced: tokio::sync::Notify,
}

impl Revocations {
    pub fn start(config: RevocationConfig) -> Result<Arc<Self>, VerifyError> {
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|e| VerifyError::Config(format!("redis_url: {e}")))?;
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            VerifyError::Config("revocation needs a Tokio runtime to run its subscriber".into())
        })?;
        let this = Arc::new(Revocations {
            config,
            state: RwLock::new(State {
                set: Set::default(),
                unsynced_since: Some(Instant::now()),
                ever_synced: false,
            }),
            synced: tokio::sync::Notify::new(),
        });
        handle.spawn(run(Arc::downgrade(&this), client));
        Ok(this)
    }

    pub fn check(&self, claims: &Claims) -> Result<(), VerifyError> {
        let now = Instant::now();
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        if let Some(since) = state.unsynced_since {
            let too_long = !state.ever_synced || now - since > self.config.max_unsynced;
            if too_long && !self.config.fail_open {
                return Err(VerifyError::RevocationUnavailable);
            }
        }
        if state.set.revokes(claims, now) {
            return Err(VerifyError::Revoked);
        }
        Ok(())
    }

    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.synced.notified();
            if self.is_synced() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                return self.is_synced();
            }
        }
    }

    fn is_synced(&self) -> bool {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.unsynced_since.is_none()
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.write().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Subscribe, resync, follow; on any failure mark unsynced and start over.
async fn run(this: std::sync::Weak<Revocations>, client: redis::Client) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(rev) = this.upgrade() else { return };
        let prefix = rev.config.key_prefix.clone();
        drop(rev);
        match follow(&this, &client, &prefix).await {
            Ok(()) => return, // the verifier was dropped
            Err(e) => {
                tracing::warn!(error = %e, "revocation feed lost; resyncing when Redis is back");
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        match this.upgrade() {
            Some(rev) => rev.with_state(|s| {
                s.unsynced_since.get_or_insert_with(Instant::now);
            }),
            None => return,
        }
        tokio::time::sleep(backoff).await;
    }
}

/// How often the subscription is pinged, and how long a ping may take, for `max_unsynced`.
fn ping_every(max_unsynced: Duration) -> Duration {
    (max_unsynced / 4).max(Duration::from_millis(25))
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "Redis did not answer in time"))
}

async fn follow(
    this: &std::sync::Weak<Revocations>,
    client: &redis::Client,
    prefix: &str,
) -> redis::RedisResult<()> {
    let Some(max_unsynced) = this.upgrade().map(|r| r.config.max_unsynced) else {
        return Ok(());
    };
    let patience = ping_every(max_unsynced);
    // Connecting and the resync get a bound too: a silent network must not hang them.
    let limit = max_unsynced.max(Duration::from_secs(1));
    let (mut sink, stream) = tokio::time::timeout(limit, async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(format!("{prefix}revocations")).await?;
        Ok::<_, redis::RedisError>(pubsub.split())
    })
    .await
    .map_err(|_| timed_out())??;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(limit))
        .set_response_timeout(Some(limit));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;

    // Full resync: every live key, into a fresh set (expired entries drop out).
    let mut fresh = Set::default();
    let pattern = format!("{prefix}revoked:*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.get(key).pttl(key);
            }
            let values: Vec<(Option<String>, i64)> = pipe.query_async(&mut conn).await?;
            for (key, (value, pttl)) in keys.iter().zip(values) {
                if let (Some(value), true) = (value, pttl > 0) {
                    let short = key.strip_prefix(prefix).unwrap_or(key);
                    fresh.apply(short, &value, Duration::from_millis(pttl as u64));
                }
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    match this.upgrade() {
        Some(rev) => {
            rev.with_state(|s| {
                // Messages are applied after this, so merging keeps both.
                let old = std::mem::take(&mut s.set);
                s.set = fresh;
                for (k, v) in old.sessions {
                    s.set.sessions.entry(k).or_insert(v);
                }
                for (k, v) in old.tokens {
                    s.set.tokens.entry(k).or_insert(v);
                }
                for (k, v) in old.users {
                    s.set.users.entry(k).or_insert(v);
                }
                s.set.prune(Instant::now());
                s.unsynced_since = None;
                s.ever_synced = true;
            });
            rev.synced.notify_waiters();
        }
        None => return Ok(()),
    }
    tracing::info!("revocation set loaded; following {prefix}revocations");

    let mut messages = stream;
    let mut prune = tokio::time::interval(Duration::from_secs(30));
    let mut ping = tokio::time::interval(patience);
    let mut last_answer = Instant::now();
    loop {
        tokio::select! {
            _ = ping.tick() => {
                let answered = tokio::time::timeout(patience, sink.ping::<redis::Value>()).await;
                match answered {
                    Ok(Ok(_)) => last_answer = Instant::now(),
                    failed => {
                        // Out of touch since the last answer, not since now.
                        if let Some(rev) = this.upgrade() {
                            rev.with_state(|s| {
                                s.unsynced_since.get_or_insert(last_answer);
                            });
                        }
                        return Err(match failed {
                            Ok(Err(e)) => e,
                            _ => timed_out(),
                        });
                    }
                }
            }
            msg = messages.next() => {
                let Some(msg) = msg else {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "subscription closed",
                    )));
                };
                let Ok(payload) = msg.get_payload::<String>() else { continue };
                let Some(rev) = this.upgrade() else { return Ok(()) };
                // "<key without prefix> <value> <ttl secs>"
                let mut parts = payload.split(' ');
                if let (Some(key), Some(value), Some(ttl)) = (parts.next(), parts.next(), parts.next())
                    && let Ok(ttl) = ttl.parse::<u64>()
                {
                    rev.with_state(|s| s.set.apply(key, value, Duration::from_secs(ttl)));
                }
            }
            _ = prune.tick() => {
                let Some(rev) = this.upgrade() else { return Ok(()) };
                rev.with_state(|s| s.set.prune(Instant::now()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(sub: Uuid, sid: Uuid, jti: &str) -> Claims {
        Claims {
            iss: String::new(),
            sub,
            aud: String::new(),
            exp: 0,
            iat: 1,
            nbf: 0,
            jti: jti.into(),
            sid,
            roles: vec![],
        }
    }

    #[test]
    fn the_set_applies_the_servers_three_kinds_of_marks() {
        let (user, sid) = (Uuid::new_v4(), Uuid::new_v4());
        let mut set = Set::default();
        let now = Instant::now();
        let c = claims(user, sid, "t1");
        assert!(!set.revokes(&c, now));
        set.apply(&format!("revoked:sid:{sid}"), "1", Duration::from_secs(60));
        assert!(set.revokes(&c, now));
        let other = claims(user, Uuid::new_v4(), "t2");
        set.apply("revoked:jti:t2", "1", Duration::from_secs(60));
        assert!(set.revokes(&other, now));
        // Issued at the start of second 1 (1000 ms): revoked by a mark at 1000, not 999.
        let third = claims(Uuid::new_v4(), Uuid::new_v4(), "t3");
        set.apply(
            &format!("revoked:user:{}", third.sub),
            "999",
            Duration::from_secs(60),
        );
        assert!(!set.revokes(&third, now));
        set.apply(
            &format!("revoked:user:{}", third.sub),
            "1000",
            Duration::from_secs(60),
        );
        assert!(set.revokes(&third, now));
        // Marks expire.
        assert!(!set.revokes(&c, now + Duration::from_secs(61)));
        set.prune(now + Duration::from_secs(61));
        assert!(set.sessions.is_empty() && set.tokens.is_empty() && set.users.is_empty());
    }
}
