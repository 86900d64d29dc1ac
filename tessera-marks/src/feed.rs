//! [`Feed`]: a copy of the marks in memory, kept current by Redis pub/sub.
//!
//! The task subscribes to `{prefix}revocations` first, then loads every existing
//! `{prefix}revoked:*` key with `SCAN` (so nothing published during the scan is lost),
//! and from then on applies each message. A check is a hash-map lookup.
//!
//! **Freshness.** A copy can be behind: a message published a moment ago may not have
//! been read yet. [`Feed::barrier`] closes that gap for a caller that must see every
//! revocation that completed before it asked (the server: a logout answered on one
//! instance is refused on every other at once). It waits until the feed has sent a
//! `PING` on the subscription connection *after* the call began, received its `PONG`,
//! and applied every message read before it. Redis answers a connection's commands in
//! order and appends a published message to each subscriber's output as part of the
//! `PUBLISH`, so any `PUBLISH` that finished before the barrier began is ahead of that
//! `PONG`; the redis client hands messages over before it completes the reply they
//! precede. One ping serves every check that arrived before it was sent, so under load a
//! round trip is shared by many requests, and Redis does one `PING` instead of one
//! `MGET` per request.
//!
//! **Liveness.** The subscription is also pinged every `max_unsynced / 4`, each ping
//! given as long again to answer: a connection that died silently (a NAT forgetting it)
//! counts as lost within `max_unsynced`. When the feed is lost it reconnects with
//! backoff and resyncs in full; meanwhile [`Feed::unsynced`] says since when, and
//! barriers fail at once so callers can ask Redis directly or refuse.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};

use crate::{Marks, Subject};

#[derive(Debug, Clone)]
pub struct FeedConfig {
    pub redis_url: String,
    /// The server's `redis.key_prefix`.
    pub key_prefix: String,
    /// A silent subscription counts as lost after this long (pinged every quarter).
    pub max_unsynced: Duration,
}

struct State {
    marks: Marks,
    /// `None` while in sync; else since when it is not (process start before the first sync).
    unsynced_since: Option<Instant>,
    ever_synced: bool,
}

/// What the barrier's waiters watch: the newest answered ping, and how many times the
/// feed was lost (a loss wakes them to give up rather than wait out their timeout).
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    answered: u64,
    losses: u64,
}

pub struct Feed {
    config: FeedConfig,
    state: RwLock<State>,
    synced: tokio::sync::Notify,
    /// Ids of pings written to the subscription (the newest one).
    sent: AtomicU64,
    /// The newest ping id some barrier waits for.
    wanted: AtomicU64,
    demand: tokio::sync::Notify,
    progress: tokio::sync::watch::Sender<Progress>,
}

impl Feed {
    /// Starts following Redis in a task on the current Tokio runtime. The feed stops
    /// when the last `Arc` is dropped.
    pub fn start(config: FeedConfig) -> Result<Arc<Feed>, redis::RedisError> {
        let client = redis::Client::open(config.redis_url.as_str())?;
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            redis::RedisError::from((
                redis::ErrorKind::Client,
                "the revocation feed needs a Tokio runtime",
            ))
        })?;
        let feed = Arc::new(Feed {
            config,
            state: RwLock::new(State {
                marks: Marks::default(),
                unsynced_since: Some(Instant::now()),
                ever_synced: false,
            }),
            synced: tokio::sync::Notify::new(),
            sent: AtomicU64::new(0),
            wanted: AtomicU64::new(0),
            demand: tokio::sync::Notify::new(),
            progress: tokio::sync::watch::Sender::new(Progress::default()),
        });
        handle.spawn(run(Arc::downgrade(&feed), client));
        Ok(feed)
    }

    /// Whether the current copy revokes `subject` (regardless of freshness).
    pub fn revokes(&self, subject: &Subject<'_>) -> bool {
        self.read().marks.revokes(subject, Instant::now())
    }

    /// `None` while in sync; else since when the copy is out of touch, and whether it
    /// was ever loaded.
    pub fn unsynced(&self) -> Option<(Instant, bool)> {
        let state = self.read();
        state.unsynced_since.map(|since| (since, state.ever_synced))
    }

    /// The number of live marks held.
    pub fn len(&self) -> usize {
        self.read().marks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the copy has been loaded from Redis (or `timeout` passes); whether
    /// it is in sync.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.synced.notified();
            if self.unsynced().is_none() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                return self.unsynced().is_none();
            }
        }
    }

    /// True once the copy holds every mark published before this call began (see the
    /// module docs); false at once while the feed is out of sync, or if that takes
    /// longer than `timeout` or the feed is lost meanwhile.
    pub async fn barrier(&self, timeout: Duration) -> bool {
        if self.unsynced().is_some() {
            return false;
        }
        let mut progress = self.progress.subscribe();
        let losses = progress.borrow().losses;
        // A ping written after this load is written after the call began.
        let need = self.sent.load(Ordering::SeqCst) + 1;
        self.wanted.fetch_max(need, Ordering::SeqCst);
        self.demand.notify_one();
        let reached = tokio::time::timeout(
            timeout,
            progress.wait_for(|p| p.answered >= need || p.losses != losses),
        )
        .await;
        matches!(reached, Ok(Ok(p)) if p.answered >= need)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.write().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records a loss: out of touch since `since` (or earlier), waiters released.
    fn lost(&self, since: Instant) {
        self.with_state(|s| {
            s.unsynced_since.get_or_insert(since);
        });
        self.progress.send_modify(|p| p.losses += 1);
    }
}

/// Subscribe, resync, follow; on any failure mark unsynced and start over.
async fn run(this: Weak<Feed>, client: redis::Client) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match follow(&this, &client).await {
            Ok(()) => return, // the feed was dropped
            Err(e) => {
                tracing::warn!(error = %e, "revocation feed lost; resyncing when Redis is back");
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        match this.upgrade() {
            Some(feed) => feed.lost(Instant::now()),
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

type Ping = std::pin::Pin<Box<dyn Future<Output = redis::RedisResult<redis::Value>> + Send>>;

async fn follow(this: &Weak<Feed>, client: &redis::Client) -> redis::RedisResult<()> {
    let Some((prefix, max_unsynced)) = this
        .upgrade()
        .map(|f| (f.config.key_prefix.clone(), f.config.max_unsynced))
    else {
        return Ok(());
    };
    let patience = ping_every(max_unsynced);
    // Connecting and the resync get a bound too: a silent network must not hang them.
    let limit = max_unsynced.max(Duration::from_secs(1));
    let (sink, mut messages) = tokio::time::timeout(limit, async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(format!("{prefix}revocations")).await?;
        Ok::<_, redis::RedisError>(pubsub.split())
    })
    .await
    .map_err(|_| timed_out())??;
    let fresh = tokio::time::timeout(limit, load(client, &prefix, limit))
        .await
        .map_err(|_| timed_out())??;
    match this.upgrade() {
        Some(feed) => {
            feed.with_state(|s| {
                // Messages are applied after this, so the union keeps both.
                let old = std::mem::replace(&mut s.marks, fresh);
                s.marks.merge(old);
                s.marks.prune(Instant::now());
                s.unsynced_since = None;
                s.ever_synced = true;
            });
            feed.synced.notify_waiters();
        }
        None => return Ok(()),
    }
    tracing::info!("revocation marks loaded; following {prefix}revocations");

    let mut prune = tokio::time::interval(Duration::from_secs(30));
    let mut keepalive = tokio::time::interval(patience);
    let mut last_answer = Instant::now();
    // The ping in flight: its id and its reply.
    let mut in_flight: Option<(u64, Ping)> = None;
    loop {
        let Some(feed) = this.upgrade() else {
            return Ok(());
        };
        let wanted = feed.wanted.load(Ordering::SeqCst);
        let answered = feed.progress.borrow().answered;
        if in_flight.is_none() && wanted > answered {
            in_flight = Some(send_ping(&feed, &sink, patience));
        }
        drop(feed);
        tokio::select! {
            biased;
            msg = messages.next() => {
                let Some(msg) = msg else {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "subscription closed",
                    )));
                };
                let Some(feed) = this.upgrade() else { return Ok(()) };
                apply(&feed, msg);
            }
            reply = async { (&mut in_flight.as_mut().expect("guarded").1).await },
                if in_flight.is_some() =>
            {
                let (id, _) = in_flight.take().expect("guarded");
                let Some(feed) = this.upgrade() else { return Ok(()) };
                if let Err(e) = reply {
                    // Out of touch since the last answer, not since now.
                    feed.lost(last_answer);
                    return Err(e);
                }
                last_answer = Instant::now();
                // Every message ahead of the PONG is already queued: apply them first.
                while let Some(Some(msg)) = messages.next().now_or_never() {
                    apply(&feed, msg);
                }
                feed.progress.send_modify(|p| p.answered = p.answered.max(id));
            }
            _ = feed_demand(this) => {}
            _ = keepalive.tick() => {
                if in_flight.is_none() {
                    let Some(feed) = this.upgrade() else { return Ok(()) };
                    in_flight = Some(send_ping(&feed, &sink, patience));
                }
            }
            _ = prune.tick() => {
                let Some(feed) = this.upgrade() else { return Ok(()) };
                feed.with_state(|s| s.marks.prune(Instant::now()));
            }
        }
    }
}

/// Resolves when a barrier asks for a ping (the loop then sends one if none is in flight).
/// Holds the feed only while the loop waits in `select!`: every branch's future is
/// dropped before the next iteration checks whether the feed is still wanted.
async fn feed_demand(this: &Weak<Feed>) {
    match this.upgrade() {
        Some(feed) => feed.demand.notified().await,
        None => std::future::pending().await,
    }
}

fn send_ping(feed: &Feed, sink: &redis::aio::PubSubSink, patience: Duration) -> (u64, Ping) {
    let id = feed.sent.fetch_add(1, Ordering::SeqCst) + 1;
    let mut sink = sink.clone();
    let reply = async move {
        tokio::time::timeout(patience, sink.ping::<redis::Value>())
            .await
            .map_err(|_| timed_out())?
    };
    (id, Box::pin(reply))
}

fn apply(feed: &Feed, msg: redis::Msg) {
    if let Ok(payload) = msg.get_payload::<String>() {
        feed.with_state(|s| s.marks.apply_message(&payload));
    }
}

/// Every live `{prefix}revoked:*` key, into a fresh set.
async fn load(client: &redis::Client, prefix: &str, limit: Duration) -> redis::RedisResult<Marks> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(limit))
        .set_response_timeout(Some(limit));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let mut fresh = Marks::default();
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
            return Ok(fresh);
        }
        cursor = next;
    }
}
