//! Two instances sharing PostgreSQL and Redis, checked for correctness under
//! concurrency (not speed).
//!
//! Each task owns one session and, until the time is up, repeats a round:
//! 1. the same refresh token goes to both instances at once: both must answer 200
//!    with the same successor (one wins the rotation, the other is inside the grace
//!    window); two different successors are a **forked chain**, a refusal is a
//!    **lost session**;
//! 2. the new access token is used on the other instance than last round: it must be
//!    accepted (a refusal is a **fresh token refused**);
//! 3. every eighth round the session is logged out on one instance and at once
//!    checked on the other: its access token must be refused there (401) and its
//!    refresh token too (400 `invalid_grant`), else a **revocation missed**; the task
//!    then logs in a new session.
//!
//! At the end every task's session must still refresh.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde::Deserialize;
use serde_json::json;

use crate::load::{Conn, Request, Stats};
use crate::scenario::{Session, Users};

pub struct PairReport {
    pub rounds: u64,
    pub forked: u64,
    pub lost: u64,
    pub fresh_refused: u64,
    pub logouts: u64,
    pub missed: u64,
    /// Latency of each refresh pair (the slower of the two answers).
    pub pairs: Stats,
    pub secs: f64,
}

impl PairReport {
    fn new() -> Self {
        PairReport {
            rounds: 0,
            forked: 0,
            lost: 0,
            fresh_refused: 0,
            logouts: 0,
            missed: 0,
            pairs: Stats::new(),
            secs: 0.0,
        }
    }

    fn add(&mut self, other: PairReport) {
        self.rounds += other.rounds;
        self.forked += other.forked;
        self.lost += other.lost;
        self.fresh_refused += other.fresh_refused;
        self.logouts += other.logouts;
        self.missed += other.missed;
        self.pairs.merge(&other.pairs);
    }

    pub fn failures(&self) -> u64 {
        self.forked + self.lost + self.fresh_refused + self.missed
    }
}

#[derive(Deserialize)]
struct Tokens {
    access_token: String,
    refresh_token: String,
}

fn refresh_request(token: &str) -> Request {
    Request::post_json("/refresh", &json!({ "refresh_token": token }))
}

/// Runs the rounds over `sessions` (one task each) for `duration`; new sessions come
/// from logging `users` in on `b`.
pub async fn check(
    a: SocketAddr,
    b: SocketAddr,
    sessions: Vec<Session>,
    users: Users,
    duration: Duration,
) -> anyhow::Result<PairReport> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for (i, session) in sessions.into_iter().enumerate() {
        let users = users.clone();
        tasks.push(tokio::spawn(async move {
            one_chain(a, b, session, users, i, deadline).await
        }));
    }
    let mut report = PairReport::new();
    for task in tasks {
        report.add(task.await??);
    }
    report.secs = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn one_chain(
    a: SocketAddr,
    b: SocketAddr,
    session: Session,
    users: Users,
    index: usize,
    deadline: Instant,
) -> anyhow::Result<PairReport> {
    let mut report = PairReport::new();
    let (mut ca, mut cb) = (Conn::open(a).await?, Conn::open(b).await?);
    let mut refresh = session.refresh_token;
    let mut next_login = index;
    while Instant::now() < deadline {
        report.rounds += 1;
        let request = refresh_request(&refresh);
        let begun = Instant::now();
        let (ra, rb) = tokio::join!(ca.send(&request), cb.send(&request));
        let ((sa, body_a), (sb, body_b)) = (ra?, rb?);
        let ok = sa == StatusCode::OK && sb == StatusCode::OK;
        report.pairs.record(
            ok,
            if ok {
                200
            } else {
                sa.as_u16().max(sb.as_u16())
            },
            begun.elapsed().as_micros() as u64,
        );
        if !ok {
            report.lost += 1;
            refresh = login(&mut cb, &users, &mut next_login).await?.refresh_token;
            continue;
        }
        let (ta, tb): (Tokens, Tokens) = (
            serde_json::from_slice(&body_a)?,
            serde_json::from_slice(&body_b)?,
        );
        if ta.refresh_token != tb.refresh_token {
            report.forked += 1;
        }
        refresh = ta.refresh_token;
        // Use the new access token on the instance that did not necessarily issue it.
        let (here, there) = match report.rounds % 2 {
            0 => (&mut ca, &mut cb),
            _ => (&mut cb, &mut ca),
        };
        let me = Request::get("/me").bearer(&ta.access_token);
        if here.send(&me).await?.0 != StatusCode::OK {
            report.fresh_refused += 1;
        }
        if report.rounds.is_multiple_of(8) {
            report.logouts += 1;
            let logout = Request::post_json("/logout", &json!({})).bearer(&ta.access_token);
            let (status, _) = there.send(&logout).await?;
            anyhow::ensure!(status == StatusCode::NO_CONTENT, "logout answered {status}");
            if here.send(&me).await?.0 != StatusCode::UNAUTHORIZED {
                report.missed += 1;
            }
            // The contract's answer to a refresh of an ended session: 400 invalid_grant.
            let (status, body) = here.send(&refresh_request(&refresh)).await?;
            let refused = status == StatusCode::BAD_REQUEST
                && serde_json::from_slice::<serde_json::Value>(&body)
                    .is_ok_and(|b| b["error"] == "invalid_grant");
            if !refused {
                report.missed += 1;
            }
            refresh = login(&mut cb, &users, &mut next_login).await?.refresh_token;
        }
    }
    // The session each task ends with must still be alive.
    if ca.send(&refresh_request(&refresh)).await?.0 != StatusCode::OK {
        report.lost += 1;
    }
    Ok(report)
}

async fn login(conn: &mut Conn, users: &Users, next: &mut usize) -> anyhow::Result<Tokens> {
    *next += 1;
    let (status, body) = conn.send(&users.login(*next)).await?;
    anyhow::ensure!(status == StatusCode::OK, "login answered {status}");
    Ok(serde_json::from_slice(&body)?)
}
