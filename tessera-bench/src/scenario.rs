//! The workloads each scenario runs, and the HTTP calls that set them up (registering
//! users, logging sessions in), all through Tessera's public API.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::json;

use crate::load::{Conn, Request, Workload};

/// The password every benchmark user has (long enough for any policy).
pub const PASSWORD: &str = "bench-password-correct-horse";

/// Users, by email, with their login bodies prepared once.
#[derive(Clone)]
pub struct Users {
    login_bodies: Arc<Vec<Bytes>>,
    emails: Arc<Vec<String>>,
}

impl Users {
    /// `count` users named after `tag` (unique per run).
    pub fn new(tag: &str, count: usize) -> Self {
        let emails: Vec<String> = (0..count)
            .map(|i| format!("bench-{tag}-{i}@example.com"))
            .collect();
        let login_bodies = emails
            .iter()
            .map(|email| Bytes::from(json!({"email": email, "password": PASSWORD}).to_string()))
            .collect();
        Users {
            login_bodies: Arc::new(login_bodies),
            emails: Arc::new(emails),
        }
    }

    pub fn len(&self) -> usize {
        self.emails.len()
    }

    pub fn login(&self, i: usize) -> Request {
        Request::post_json_bytes(
            "/login",
            self.login_bodies[i % self.login_bodies.len()].clone(),
        )
    }
}

#[derive(Deserialize)]
pub struct Session {
    pub access_token: String,
    pub refresh_token: String,
}

fn session_from(status: StatusCode, body: &[u8]) -> Option<Session> {
    if status != StatusCode::OK {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// Registers every user through `POST /users` over `connections` connections. A user
/// that exists already (409) is fine.
pub async fn register(addr: SocketAddr, users: &Users, connections: usize) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let users = users.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            for i in (c..users.len()).step_by(connections) {
                let body = json!({"email": users.emails[i], "password": PASSWORD});
                let (status, _) = conn.send(&Request::post_json("/users", &body)).await?;
                if status != StatusCode::CREATED && status != StatusCode::CONFLICT {
                    anyhow::bail!("POST /users answered {status}");
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Logs in `count` sessions, spread over the users, over `connections` connections.
pub async fn login_sessions(
    addr: SocketAddr,
    users: &Users,
    count: usize,
    connections: usize,
) -> anyhow::Result<Vec<Session>> {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let users = users.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            let mut sessions = Vec::new();
            for i in (c..count).step_by(connections) {
                let (status, body) = conn.send(&users.login(i)).await?;
                let session = session_from(status, &body)
                    .ok_or_else(|| anyhow::anyhow!("POST /login answered {status}"))?;
                sessions.push(session);
            }
            anyhow::Ok(sessions)
        }));
    }
    let mut all = Vec::with_capacity(count);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

/// The same request again and again (`/health/live`, `/me`, `/introspect`).
pub struct Repeat {
    pub kind: &'static str,
    pub request: Request,
    pub expect: StatusCode,
}

impl Workload for Repeat {
    fn next(&mut self) -> Option<(&'static str, Request)> {
        Some((self.kind, self.request.clone()))
    }

    fn answer(&mut self, _: &'static str, status: StatusCode, _: &[u8]) -> bool {
        status == self.expect
    }
}

/// `POST /login` cycling through the users, starting at a different one per connection.
pub struct Logins {
    pub users: Users,
    pub next: usize,
}

impl Workload for Logins {
    fn next(&mut self) -> Option<(&'static str, Request)> {
        self.next += 1;
        Some(("login", self.users.login(self.next)))
    }

    fn answer(&mut self, _: &'static str, status: StatusCode, _: &[u8]) -> bool {
        status == StatusCode::OK
    }
}

/// One session's refresh chain: each refresh presents the token the previous one got.
/// A broken chain (a failed refresh) ends the workload, and shows as a failure.
pub struct RefreshChain {
    pub token: Option<String>,
}

fn refresh_request(token: &str) -> Request {
    Request::post_json("/refresh", &json!({ "refresh_token": token }))
}

impl Workload for RefreshChain {
    fn next(&mut self) -> Option<(&'static str, Request)> {
        Some(("refresh", refresh_request(self.token.as_deref()?)))
    }

    fn answer(&mut self, _: &'static str, status: StatusCode, body: &[u8]) -> bool {
        self.token = session_from(status, body).map(|s| s.refresh_token);
        self.token.is_some()
    }
}

/// `POST /logout` once for each session it was given.
pub struct Logouts {
    pub access_tokens: Vec<String>,
}

impl Workload for Logouts {
    fn next(&mut self) -> Option<(&'static str, Request)> {
        let token = self.access_tokens.pop()?;
        Some((
            "logout",
            Request::post_json("/logout", &json!({})).bearer(&token),
        ))
    }

    fn answer(&mut self, _: &'static str, status: StatusCode, _: &[u8]) -> bool {
        status == StatusCode::NO_CONTENT
    }
}

/// An SPA's life: log in, then 200 `/me` calls with a refresh after every 10 of them
/// (1 login : 20 refreshes : 200 `/me`), then log in again.
pub struct Spa {
    pub users: Users,
    pub user: usize,
    pub step: u32,
    pub session: Option<Session>,
}

/// Requests in one SPA cycle: the login, then 220 calls.
const SPA_CYCLE: u32 = 221;

impl Workload for Spa {
    fn next(&mut self) -> Option<(&'static str, Request)> {
        let Some(session) = self.session.as_ref().filter(|_| self.step != 0) else {
            self.step = 0;
            self.user += 1;
            return Some(("login", self.users.login(self.user)));
        };
        if self.step.is_multiple_of(11) {
            Some(("refresh", refresh_request(&session.refresh_token)))
        } else {
            Some(("me", Request::get("/me").bearer(&session.access_token)))
        }
    }

    fn answer(&mut self, kind: &'static str, status: StatusCode, body: &[u8]) -> bool {
        let ok = match kind {
            "me" => status == StatusCode::OK,
            _ => match session_from(status, body) {
                Some(session) => {
                    self.session = Some(session);
                    true
                }
                // A failed login or refresh: start over with a login.
                None => {
                    self.session = None;
                    false
                }
            },
        };
        self.step = (self.step + 1) % SPA_CYCLE;
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spa_cycle_is_1_login_20_refreshes_200_me() {
        let mut spa = Spa {
            users: Users::new("t", 1),
            user: 0,
            step: 0,
            session: None,
        };
        let tokens = br#"{"access_token":"a","refresh_token":"r"}"#;
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..SPA_CYCLE * 3 {
            let (kind, _) = spa.next().unwrap();
            *counts.entry(kind).or_insert(0) += 1;
            spa.answer(kind, StatusCode::OK, tokens);
        }
        assert_eq!(counts["login"], 3);
        assert_eq!(counts["refresh"], 60);
        assert_eq!(counts["me"], 600);
    }
}
