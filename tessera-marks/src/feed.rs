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
//! **Leases (server instances).** A barrier still costs every check a wait for a round
//! trip. With [`FeedConfig::lease`] set, the feed also takes part in acknowledged
//! revocations, which move that cost to the (rare) revocation instead:
//! - the copy counts as *current* while the newest answered ping was written less
//!   than `lease` ago ([`Feed::current`]); the feed pings every `lease / 4`, so in
//!   steady state every check is answered from memory, with no wait at all;
//! - an instance that revokes publishes, after the marks, an *ack request* on
//!   `{prefix}instances` (PUBLISH returns how many instances heard it); each instance
//!   applies the marks ahead of it (same connection, same order), then publishes an
//!   ack on the requester's `{prefix}acks:<id>`; the revoker answers its client once
//!   every instance acknowledged, or once `lease` has passed since Redis took the
//!   publish ([`Feed::settle`]).
//!
//! Why that is enough: an instance that has not applied the marks when the revoker
//! answers either acknowledged (impossible: it acks after applying) or has had no ping
//! written after the publish answered yet; its newest answered ping was written before
//! the publish, more than `lease` ago, so its copy is not current and its checks use
//! the barrier (or Redis). Only durations are compared, each on one machine's
//! monotonic clock, never timestamps across machines.
//!
//! **Liveness.** The subscription is also pinged every `max_unsynced / 4`, each ping
//! given as long again to answer: a connection that died silently (a NAT forgetting it)
//! counts as lost within `max_unsynced`. When the feed is lost it reconnects with
//! backoff and resyncs in full; meanwhile [`Feed::unsynced`] says since when, and
//! barriers fail at once so callers can ask Redis directly or refuse.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};

use crate::{Marks, Subject};

#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// `redis://`, `rediss://` or `redis+sentinel://` (see [`crate::Source`]).
    pub redis_url: String,
    /// PEM CA certificates that sign a `rediss://` server's certificate, instead of the
    /// system's roots (see [`client`]).
    pub ca_pem: Option<Vec<u8>>,
    /// The server's `redis.key_prefix`.
    pub key_prefix: String,
    /// A silent subscription counts as lost after this long (pinged every quarter).
    pub max_unsynced: Duration,
    /// Server instances: answer checks from memory while the copy is this fresh, and
    /// take part in acknowledged revocations (see the module docs). `None` for
    /// downstream verifiers, which neither acknowledge nor wait for acks.
    pub lease: Option<Duration>,
}

/// A client for `url`; for `rediss://`, TLS whose server certificate must chain to one
/// of `ca_pem`'s certificates when given, else to one of the system's roots. Nothing
/// here sets a TLS provider: a process with more than one must install its default
/// (`rustls::crypto::CryptoProvider::install_default`) before connecting.
pub fn client(url: &str, ca_pem: Option<&[u8]>) -> redis::RedisResult<redis::Client> {
    match ca_pem {
        None => redis::Client::open(url),
        Some(_) if !url.starts_with("rediss://") => Err(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "a CA certificate is given for Redis, but its URL is not rediss://",
        ))),
        Some(pem) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
    }
}

/// The ack request of a revoker without a copy of its own: nobody to answer.
pub const NO_ACKS: &str = "- 0";

/// The channel on which revokers ask server instances to acknowledge.
pub fn instances_channel(prefix: &str) -> String {
    format!("{prefix}instances")
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
    /// Where microsecond clocks below count from.
    base: Instant,
    /// When the newest answered ping was written, in µs since `base` (0: none since the
    /// subscription was last (re)made).
    fresh_as_of: AtomicU64,
    /// This feed's ack channel, `{prefix}acks:<random id>`.
    ack_channel: String,
    next_request: AtomicU64,
    /// Ack requests of this instance's revocations, by id: acks received so far.
    pending: Mutex<HashMap<u64, Arc<AckCount>>>,
}

#[derive(Default)]
struct AckCount {
    received: AtomicU64,
    arrived: tokio::sync::Notify,
}

/// An ack request of one revocation: its payload goes out after the marks.
pub struct AckRequest<'a> {
    feed: &'a Feed,
    id: u64,
    count: Arc<AckCount>,
    /// `"<ack channel> <id>"`, for [`instances_channel`].
    pub payload: String,
}

impl Drop for AckRequest<'_> {
    fn drop(&mut self) {
        self.feed.pending_map().remove(&self.id);
    }
}

impl Feed {
    /// Starts following Redis in a task on the current Tokio runtime. The feed stops
    /// when the last `Arc` is dropped.
    pub fn start(config: FeedConfig) -> Result<Arc<Feed>, redis::RedisError> {
        let source = crate::Source::parse(&config.redis_url, config.ca_pem.as_deref())?;
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            redis::RedisError::from((
                redis::ErrorKind::Client,
                "the revocation feed needs a Tokio runtime",
            ))
        })?;
        let feed = Arc::new(Feed {
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
            base: Instant::now(),
            fresh_as_of: AtomicU64::new(0),
            ack_channel: format!(
                "{}acks:{}",
                config.key_prefix,
                uuid::Uuid::new_v4().simple()
            ),
            next_request: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            config,
        });
        handle.spawn(run(Arc::downgrade(&feed), source));
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

    /// True while the copy holds every mark whose revocation has been answered by any
    /// instance (a lease is configured, the copy is in sync and a ping written less
    /// than `lease` ago has been answered): a check may then use it without waiting.
    pub fn current(&self) -> bool {
        let Some(lease) = self.config.lease else {
            return false;
        };
        let as_of = self.fresh_as_of.load(Ordering::Acquire);
        as_of != 0 && self.micros_now().saturating_sub(as_of) < lease.as_micros() as u64
    }

    /// Registers an ack request for a revocation about to be written.
    pub fn ack_request(&self) -> AckRequest<'_> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let count = Arc::new(AckCount::default());
        self.pending_map().insert(id, count.clone());
        AckRequest {
            feed: self,
            id,
            count,
            payload: format!("{} {id}", self.ack_channel),
        }
    }

    /// After the revocation and its ack request were written (`heard`: how many
    /// instances the request reached), waits until each acknowledged or `lease` has
    /// passed. Call it as soon as Redis answered the write.
    pub async fn settle(&self, request: AckRequest<'_>, heard: u64) {
        let Some(lease) = self.config.lease else {
            return;
        };
        let deadline = tokio::time::Instant::now() + lease;
        loop {
            let arrived = request.count.arrived.notified();
            if request.count.received.load(Ordering::Acquire) >= heard {
                return;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                tracing::debug!(
                    heard,
                    acked = request.count.received.load(Ordering::Acquire),
                    "not every instance acknowledged a revocation; waited out the lease"
                );
                return;
            }
        }
    }

    fn pending_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<AckCount>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn micros_now(&self) -> u64 {
        self.micros(Instant::now())
    }

    fn micros(&self, at: Instant) -> u64 {
        // +1: 0 means "none".
        at.saturating_duration_since(self.base).as_micros() as u64 + 1
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.write().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records a loss: out of touch since `since` (or earlier), waiters released.
    fn lost(&self, since: Instant) {
        self.fresh_as_of.store(0, Ordering::Release);
        self.with_state(|s| {
            s.unsynced_since.get_or_insert(since);
        });
        self.progress.send_modify(|p| p.losses += 1);
    }
}

/// Subscribe, resync, follow; on any failure mark unsynced and start over.
async fn run(this: Weak<Feed>, source: crate::Source) {
    let mut backoff = Duration::from_millis(100);
    loop {
        // Asked again at every start: behind Sentinel, the primary of the moment.
        let followed = match source.client().await {
            Ok(client) => follow(&this, &client).await,
            Err(e) => Err(e),
        };
        match followed {
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

/// A ping's id, when it was made (no later than written), and its reply.
type Ping = std::pin::Pin<
    Box<dyn Future<Output = (u64, Instant, redis::RedisResult<redis::Value>)> + Send>,
>;

/// Pings written ahead of their replies at most (a check waits for the next one written
/// after it began; under load several are on the wire at once).
const MAX_IN_FLIGHT: usize = 4;

async fn follow(this: &Weak<Feed>, client: &redis::Client) -> redis::RedisResult<()> {
    let Some((prefix, max_unsynced, lease, ack_channel)) = this.upgrade().map(|f| {
        (
            f.config.key_prefix.clone(),
            f.config.max_unsynced,
            f.config.lease,
            f.ack_channel.clone(),
        )
    }) else {
        return Ok(());
    };
    let patience = ping_every(max_unsynced);
    let revocations = format!("{prefix}revocations");
    let instances = instances_channel(&prefix);
    // Connecting and the resync get a bound too: a silent network must not hang them.
    let limit = max_unsynced.max(Duration::from_secs(1));
    let (sink, mut messages) = tokio::time::timeout(limit, async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&revocations).await?;
        if lease.is_some() {
            pubsub.subscribe(&[&instances, &ack_channel]).await?;
        }
        Ok::<_, redis::RedisError>(pubsub.split())
    })
    .await
    .map_err(|_| timed_out())??;
    let (fresh, conn) = tokio::time::timeout(limit, load(client, &prefix, limit))
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
    tracing::info!("revocation marks loaded; following {revocations}");

    let handler = Handler {
        revocations,
        instances,
        ack_channel,
        conn,
    };
    let mut prune = tokio::time::interval(Duration::from_secs(30));
    // With a lease, pinged often enough that the copy stays current while Redis answers.
    let mut keepalive = tokio::time::interval(match lease {
        Some(lease) => patience.min(lease / 4),
        None => patience,
    });
    let mut last_answer = Instant::now();
    // Pings written and not answered yet, oldest first (Redis answers in order).
    let mut in_flight: FuturesOrdered<Ping> = FuturesOrdered::new();
    loop {
        let Some(feed) = this.upgrade() else {
            return Ok(());
        };
        // A barrier waits for a ping not written yet: write one now rather than after
        // the replies in flight, so a check waits one round trip, not up to two.
        let wanted = feed.wanted.load(Ordering::SeqCst);
        if wanted > feed.sent.load(Ordering::SeqCst) && in_flight.len() < MAX_IN_FLIGHT {
            in_flight.push_back(send_ping(&feed, &sink, patience));
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
                handler.handle(&feed, msg);
            }
            Some((id, written, reply)) = in_flight.next(), if !in_flight.is_empty() => {
                let Some(feed) = this.upgrade() else { return Ok(()) };
                if let Err(e) = reply {
                    // Out of touch since the last answer, not since now.
                    feed.lost(last_answer);
                    return Err(e);
                }
                last_answer = Instant::now();
                // Every message ahead of the PONG is already queued: apply them first.
                while let Some(Some(msg)) = messages.next().now_or_never() {
                    handler.handle(&feed, msg);
                }
                feed.fresh_as_of.fetch_max(feed.micros(written), Ordering::AcqRel);
                feed.progress.send_modify(|p| p.answered = p.answered.max(id));
            }
            _ = feed_demand(this) => {}
            _ = keepalive.tick() => {
                if in_flight.is_empty() {
                    let Some(feed) = this.upgrade() else { return Ok(()) };
                    in_flight.push_back(send_ping(&feed, &sink, patience));
                }
            }
            _ = prune.tick() => {
                let Some(feed) = this.upgrade() else { return Ok(()) };
                feed.with_state(|s| s.marks.prune(Instant::now()));
            }
        }
    }
}

/// What the follow loop does with each message, by channel.
struct Handler {
    revocations: String,
    instances: String,
    ack_channel: String,
    /// For publishing acks.
    conn: redis::aio::MultiplexedConnection,
}

impl Handler {
    fn handle(&self, feed: &Feed, msg: redis::Msg) {
        let channel = msg.get_channel_name();
        let Ok(payload) = msg.get_payload::<String>() else {
            return;
        };
        if channel == self.revocations {
            feed.with_state(|s| s.marks.apply_message(&payload));
        } else if channel == self.instances {
            // "<ack channel> <id>": every message ahead of it is applied; say so.
            if let Some((to, id)) = payload.split_once(' ')
                && payload != NO_ACKS
            {
                let (to, id, mut conn) = (to.to_owned(), id.to_owned(), self.conn.clone());
                tokio::spawn(async move {
                    let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                        .arg(to)
                        .arg(id)
                        .query_async(&mut conn)
                        .await;
                    if let Err(e) = sent {
                        tracing::debug!(error = %e, "could not acknowledge a revocation");
                    }
                });
            }
        } else if channel == self.ack_channel
            && let Ok(id) = payload.parse::<u64>()
            && let Some(count) = feed.pending_map().get(&id).cloned()
        {
            count.received.fetch_add(1, Ordering::AcqRel);
            count.arrived.notify_one();
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

fn send_ping(feed: &Feed, sink: &redis::aio::PubSubSink, patience: Duration) -> Ping {
    let made = Instant::now();
    let id = feed.sent.fetch_add(1, Ordering::SeqCst) + 1;
    let mut sink = sink.clone();
    Box::pin(async move {
        let reply = tokio::time::timeout(patience, sink.ping::<redis::Value>())
            .await
            .map_err(|_| timed_out())
            .and_then(|r| r);
        (id, made, reply)
    })
}

/// Every live `{prefix}revoked:*` key, into a fresh set; and the connection it used.
async fn load(
    client: &redis::Client,
    prefix: &str,
    limit: Duration,
) -> redis::RedisResult<(Marks, redis::aio::MultiplexedConnection)> {
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
            return Ok((fresh, conn));
        }
        cursor = next;
    }
}
