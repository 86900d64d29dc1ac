//! Prometheus metrics, served on their own listener (`metrics.listen`, see
//! `startup`), never on the API's port. Each server has its own registry (no global
//! one), so servers in one process (the tests) count apart.
//!
//! Counters and histograms are updated where things happen: the HTTP middleware
//! (requests by route pattern, method and status class), the auth service (logins,
//! refreshes and revocations by outcome), the hashing pool (queue wait and hash time),
//! the Redis calls (round trips and errors). Gauges that describe a state (hashing
//! queue depth, database pool, signing key age) are read when scraped
//! ([`Snapshot`]). The database acquire time comes from a probe that takes a pooled
//! connection once a second, as a request would ([`Metrics::acquired`]).
//!
//! This module depends on nothing else of Tessera's.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The Content-Type of [`Metrics::render`]'s text (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Request latencies: from half a millisecond (a refresh) to 10 s (a login queued
/// behind a flood).
fn latency_buckets() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// Round trips to Redis and waits for a pooled connection: 50 µs to 1 s.
fn short_buckets() -> Histogram {
    Histogram::new([
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    ])
}

/// What is read when scraped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// Database connections handed out to requests, and idle in the pool.
    pub db_in_use: u32,
    pub db_idle: u32,
    pub db_max: u32,
    /// Seconds since the signing key was created.
    pub signing_key_age_secs: f64,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Histograms<RouteLabels>,
    logins: Family<OutcomeLabels, Counter>,
    refreshes: Family<OutcomeLabels, Counter>,
    revocations: Family<KindLabels, Counter>,
    hash_queue: Gauge,
    hash_wait_seconds: Histogram,
    hash_seconds: Histogram,
    db_connections: Family<StateLabels, Gauge>,
    db_max_connections: Gauge,
    db_acquire_seconds: Histogram,
    redis_seconds: Histogram,
    redis_errors: Counter,
    signing_key_age: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_buckets),
            logins: Family::default(),
            refreshes: Family::default(),
            revocations: Family::default(),
            hash_queue: Gauge::default(),
            hash_wait_seconds: latency_buckets(),
            hash_seconds: latency_buckets(),
            db_connections: Family::default(),
            db_max_connections: Gauge::default(),
            db_acquire_seconds: short_buckets(),
            redis_seconds: short_buckets(),
            redis_errors: Counter::default(),
            signing_key_age: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "tessera_http_requests",
            "HTTP requests answered, by route pattern, method and status class",
            m.requests.clone(),
        );
        r.register(
            "tessera_http_request_duration_seconds",
            "Time from a request's arrival to its answer, by route pattern and method",
            m.request_seconds.clone(),
        );
        r.register(
            "tessera_logins",
            "Password logins (POST /login, POST /login/mfa) by outcome",
            m.logins.clone(),
        );
        r.register(
            "tessera_refreshes",
            "Refresh token presentations by outcome (rotated, grace, or the error_reason)",
            m.refreshes.clone(),
        );
        r.register(
            "tessera_revocations",
            "Revocation marks written: sessions, single access tokens, users' tokens",
            m.revocations.clone(),
        );
        r.register(
            "tessera_password_hash_queue_depth",
            "Password hashing jobs waiting for a thread",
            m.hash_queue.clone(),
        );
        r.register(
            "tessera_password_hash_wait_seconds",
            "Time a password hashing job waited for a thread",
            m.hash_wait_seconds.clone(),
        );
        r.register(
            "tessera_password_hash_seconds",
            "Time a password hashing job took on its thread (argon2)",
            m.hash_seconds.clone(),
        );
        r.register(
            "tessera_db_connections",
            "Database connections by state: in_use (by a request) or idle (pooled)",
            m.db_connections.clone(),
        );
        r.register(
            "tessera_db_max_connections",
            "The database pool's limit (database.max_connections)",
            m.db_max_connections.clone(),
        );
        r.register(
            "tessera_db_acquire_seconds",
            "Time to get a pooled database connection, probed once a second",
            m.db_acquire_seconds.clone(),
        );
        r.register(
            "tessera_redis_command_seconds",
            "Round trip of a Redis command or pipeline",
            m.redis_seconds.clone(),
        );
        r.register(
            "tessera_redis_errors",
            "Redis commands that failed (unreachable, timed out, refused)",
            m.redis_errors.clone(),
        );
        r.register(
            "tessera_signing_key_age_seconds",
            "Age of the key that signs access tokens",
            m.signing_key_age.clone(),
        );
        m
    }

    /// One answered request. `route` is the matched pattern (`/admin/users/{id}`), or
    /// `"unmatched"`: never the raw path, which would make a label per user id.
    pub fn request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let status = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let (route, method) = (route.to_owned(), method.to_owned());
        self.request_seconds
            .get_or_create(&RouteLabels {
                route: route.clone(),
                method: method.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status,
            })
            .inc();
    }

    pub fn login(&self, outcome: &'static str) {
        self.logins.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn refresh(&self, outcome: &'static str) {
        self.refreshes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// `n` revocation marks of `kind` ("session", "token", "user").
    pub fn revoked(&self, kind: &'static str, n: usize) {
        self.revocations
            .get_or_create(&KindLabels { kind })
            .inc_by(n as u64);
    }

    /// A hashing job joins the queue.
    pub fn hash_queued(&self) {
        self.hash_queue.inc();
    }

    /// A job counted by [`Metrics::hash_queued`] could not be queued after all.
    pub fn hash_not_queued(&self) {
        self.hash_queue.dec();
    }

    /// A hashing job leaves the queue for a thread after `waited`.
    pub fn hash_started(&self, waited: Duration) {
        self.hash_queue.dec();
        self.hash_wait_seconds.observe(waited.as_secs_f64());
    }

    pub fn hash_done(&self, took: Duration) {
        self.hash_seconds.observe(took.as_secs_f64());
    }

    pub fn acquired(&self, took: Duration) {
        self.db_acquire_seconds.observe(took.as_secs_f64());
    }

    /// Times one Redis call and counts it as an error when it fails.
    pub async fn redis<T, E>(&self, call: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        let started = std::time::Instant::now();
        let result = call.await;
        self.redis_seconds.observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.redis_errors.inc();
        }
        result
    }

    /// The text a scrape gets, with the gauges set from `now`.
    pub fn render(&self, now: Snapshot) -> String {
        let connections = |state| self.db_connections.get_or_create(&StateLabels { state });
        connections("in_use").set(now.db_in_use.into());
        connections("idle").set(now.db_idle.into());
        self.db_max_connections.set(now.db_max.into());
        self.signing_key_age.set(now.signing_key_age_secs);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions_and_routes_are_patterns() {
        let m = Metrics::new();
        m.request("/admin/users/{id}", "GET", 404, Duration::from_millis(3));
        m.login("bad_credentials");
        m.refresh("rotated");
        m.revoked("session", 2);
        m.hash_queued();
        let text = m.render(Snapshot {
            db_in_use: 3,
            db_idle: 5,
            db_max: 16,
            signing_key_age_secs: 60.0,
        });
        for line in [
            r#"tessera_http_requests_total{route="/admin/users/{id}",method="GET",status="4xx"} 1"#,
            r#"tessera_http_request_duration_seconds_bucket{route="/admin/users/{id}",method="GET",le="0.005"} 1"#,
            r#"tessera_logins_total{outcome="bad_credentials"} 1"#,
            r#"tessera_refreshes_total{outcome="rotated"} 1"#,
            r#"tessera_revocations_total{kind="session"} 2"#,
            "tessera_password_hash_queue_depth 1",
            r#"tessera_db_connections{state="in_use"} 3"#,
            r#"tessera_db_connections{state="idle"} 5"#,
            "tessera_db_max_connections 16",
            "tessera_signing_key_age_seconds 60.0",
            "tessera_redis_errors_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        for name in text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
        {
            assert!(name.starts_with("tessera_"), "{name}");
        }
    }
}
