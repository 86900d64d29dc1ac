//! The load generator: many keep-alive HTTP/1.1 connections, each driven by its own
//! [`Workload`], in one of two modes:
//! - closed loop: each connection sends its next request as soon as the previous answer
//!   arrives (throughput at a given concurrency);
//! - fixed rate: requests are due at a fixed total rate, spread over the connections;
//!   latency is measured from when a request was *due*, not when it was sent, so a
//!   stalled server is charged for the requests it kept waiting (no coordinated
//!   omission, as in wrk2).
//!
//! Latencies go into one HdrHistogram per request kind (microseconds, 3 significant
//! digits). A ticker prints progress to stderr every second.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One request, built by a workload.
#[derive(Clone)]
pub struct Request {
    pub method: Method,
    pub path: &'static str,
    pub content_type: Option<&'static str>,
    pub authorization: Option<HeaderValue>,
    pub body: Bytes,
}

impl Request {
    pub fn get(path: &'static str) -> Self {
        Request {
            method: Method::GET,
            path,
            content_type: None,
            authorization: None,
            body: Bytes::new(),
        }
    }

    pub fn post_json(path: &'static str, body: &serde_json::Value) -> Self {
        Request::post_json_bytes(path, Bytes::from(body.to_string()))
    }

    /// A JSON body serialized beforehand (shared, not copied, between requests).
    pub fn post_json_bytes(path: &'static str, body: Bytes) -> Self {
        Request {
            method: Method::POST,
            path,
            content_type: Some("application/json"),
            authorization: None,
            body,
        }
    }

    pub fn post_form(path: &'static str, body: String) -> Self {
        Request {
            method: Method::POST,
            path,
            content_type: Some("application/x-www-form-urlencoded"),
            authorization: None,
            body: Bytes::from(body),
        }
    }

    pub fn bearer(mut self, token: &str) -> Self {
        self.authorization = HeaderValue::try_from(format!("Bearer {token}")).ok();
        self
    }

    pub fn basic(mut self, id: &str, secret: &str) -> Self {
        use base64::Engine;
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        self.authorization = HeaderValue::try_from(format!("Basic {credentials}")).ok();
        self
    }
}

/// What a connection sends next and how it reads the answers.
pub trait Workload: Send + 'static {
    /// The next request and its kind (the histogram it lands in); `None` when the
    /// workload has nothing left to send.
    fn next(&mut self) -> Option<(&'static str, Request)>;
    /// Reads the answer; returns whether it is the expected success.
    fn answer(&mut self, kind: &'static str, status: StatusCode, body: &[u8]) -> bool;
}

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    addr: SocketAddr,
    host: HeaderValue,
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the server closes the connection or the sender is dropped.
            let _ = connection.await;
        });
        Ok(Conn {
            addr,
            host: HeaderValue::try_from(addr.to_string())?,
            sender,
        })
    }

    /// Sends one request and reads the whole answer. After a transport error the
    /// connection is reopened for the next call.
    pub async fn send(&mut self, req: &Request) -> anyhow::Result<(StatusCode, Bytes)> {
        let result = self.try_send(req).await;
        if result.is_err() {
            *self = Conn::open(self.addr).await?;
        }
        result
    }

    async fn try_send(&mut self, req: &Request) -> anyhow::Result<(StatusCode, Bytes)> {
        self.sender.ready().await?;
        let mut builder = hyper::Request::builder()
            .method(req.method.clone())
            .uri(req.path)
            .header(HOST, self.host.clone());
        if let Some(ct) = req.content_type {
            builder = builder.header(CONTENT_TYPE, ct);
        }
        if let Some(auth) = &req.authorization {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        let response = self
            .sender
            .send_request(builder.body(Full::new(req.body.clone()))?)
            .await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// How requests are paced.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Next request as soon as the answer is in.
    Closed,
    /// This many requests per second in total, spread evenly over the connections.
    Rate(f64),
}

#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub pace: Pace,
    /// Sending stops after this long (or when every workload is exhausted).
    pub duration: Duration,
    /// Answers to requests sent before this much time has passed are not recorded.
    pub warmup: Duration,
}

/// Latency and counts of one kind of request.
pub struct Stats {
    pub ok: u64,
    pub failed: u64,
    /// Failed answers by status (0: transport error).
    pub failures: BTreeMap<u16, u64>,
    /// Latency of successful requests, in microseconds.
    pub latency: Histogram<u64>,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            ok: 0,
            failed: 0,
            failures: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
        }
    }

    pub fn record(&mut self, ok: bool, status: u16, micros: u64) {
        if ok {
            self.ok += 1;
            let _ = self.latency.record(micros.max(1));
        } else {
            self.failed += 1;
            *self.failures.entry(status).or_default() += 1;
        }
    }

    pub fn merge(&mut self, other: &Stats) {
        self.ok += other.ok;
        self.failed += other.failed;
        for (status, n) in &other.failures {
            *self.failures.entry(*status).or_default() += n;
        }
        let _ = self.latency.add(&other.latency);
    }

    /// The latency at `q` (0..1) in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.latency.max() as f64 / 1000.0
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

/// What one run measured.
pub struct Outcome {
    pub by_kind: BTreeMap<&'static str, Stats>,
    /// The measured window (after warmup), in seconds.
    pub secs: f64,
}

impl Outcome {
    pub fn kind(&self, kind: &str) -> &Stats {
        static EMPTY: std::sync::OnceLock<Stats> = std::sync::OnceLock::new();
        self.by_kind
            .get(kind)
            .unwrap_or_else(|| EMPTY.get_or_init(Stats::new))
    }

    /// Successful requests of `kind` per second.
    pub fn rate(&self, kind: &str) -> f64 {
        self.kind(kind).ok as f64 / self.secs
    }
}

/// Progress counters shared with the ticker.
#[derive(Default)]
struct Progress {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Runs one workload per connection against `addr` and gathers the latencies.
pub async fn run<W: Workload>(
    label: &str,
    addr: SocketAddr,
    plan: Plan,
    workloads: Vec<W>,
) -> anyhow::Result<Outcome> {
    let connections = workloads.len().max(1);
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::open(addr).await?);
    }
    let progress = Arc::new(Progress::default());
    let finished = Arc::new(AtomicBool::new(false));
    let ticker = tokio::spawn(tick(
        label.to_owned(),
        progress.clone(),
        finished.clone(),
        plan.duration,
    ));

    let start = tokio::time::Instant::now();
    let measure_from = start + plan.warmup;
    let end = start + plan.duration;
    let mut tasks = Vec::with_capacity(connections);
    for (i, (mut workload, mut conn)) in workloads.into_iter().zip(conns).enumerate() {
        let progress = progress.clone();
        // Fixed rate: connection i sends at start + (i/n + k) * interval.
        let interval = match plan.pace {
            Pace::Closed => None,
            Pace::Rate(r) => Some(Duration::from_secs_f64(connections as f64 / r)),
        };
        tasks.push(tokio::spawn(async move {
            let mut stats: BTreeMap<&'static str, Stats> = BTreeMap::new();
            let mut due = interval.map(|iv| start + iv.mul_f64(i as f64 / connections as f64));
            loop {
                if let Some(at) = due {
                    if at >= end {
                        break;
                    }
                    tokio::time::sleep_until(at).await;
                }
                let now = tokio::time::Instant::now();
                if now >= end {
                    break;
                }
                let Some((kind, request)) = workload.next() else {
                    break;
                };
                let began = due.unwrap_or(now);
                let (ok, status) = match conn.send(&request).await {
                    Ok((status, body)) => (workload.answer(kind, status, &body), status.as_u16()),
                    Err(_) => (false, 0),
                };
                let micros = began.elapsed().as_micros() as u64;
                if began >= measure_from {
                    stats.entry(kind).or_default().record(ok, status, micros);
                }
                let counter = if ok { &progress.ok } else { &progress.failed };
                counter.fetch_add(1, Ordering::Relaxed);
                if let (Some(at), Some(iv)) = (due.as_mut(), interval) {
                    *at += iv;
                }
            }
            stats
        }));
    }
    let mut by_kind: BTreeMap<&'static str, Stats> = BTreeMap::new();
    for task in tasks {
        for (kind, stats) in task.await? {
            by_kind.entry(kind).or_default().merge(&stats);
        }
    }
    let elapsed = start.elapsed().min(plan.duration);
    finished.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    Ok(Outcome {
        by_kind,
        secs: elapsed.saturating_sub(plan.warmup).as_secs_f64().max(1e-3),
    })
}

async fn tick(label: String, progress: Arc<Progress>, finished: Arc<AtomicBool>, total: Duration) {
    let started = Instant::now();
    let mut last = 0;
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.tick().await;
    loop {
        interval.tick().await;
        if finished.load(Ordering::Relaxed) {
            break;
        }
        let ok = progress.ok.load(Ordering::Relaxed);
        let failed = progress.failed.load(Ordering::Relaxed);
        eprintln!(
            "  {label}: {:>3.0}/{:.0} s  {ok} ok  {failed} failed  {} req/s",
            started.elapsed().as_secs_f64(),
            total.as_secs_f64(),
            ok - last
        );
        last = ok;
    }
}
