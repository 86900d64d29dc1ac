//! The machine's own limits, measured in the same run as the scenarios, so each
//! scenario can be reported as a fraction of what the hardware allows:
//! - argon2 verifications per second with the configured parameters, one thread per core;
//! - raw signatures and signature checks per second with the configured algorithm and
//!   the server's own key, one thread per core;
//! - the database work of a refresh (Tessera's own rotation statement, through its
//!   store) at the refresh scenario's concurrency, with no HTTP, JSON or JWT around it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use argon2::{PasswordHasher, PasswordVerifier};
use tessera::auth::keys::KeyStore;
use tessera::auth::refresh_token::RefreshToken;
use tessera::config::{PasswordSettings, Settings};
use tessera::store::Backend;
use tessera::store::{ClientInfo, Rotation};

use crate::load::{Outcome, Stats};

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Runs `work` on one thread per core for `duration`; returns calls per second.
fn per_second_on_all_cores(duration: Duration, work: impl Fn() + Sync) -> f64 {
    per_second(cores(), duration, work)
}

/// Runs `work` on `threads` threads for `duration`; returns calls per second.
fn per_second(threads: usize, duration: Duration, work: impl Fn() + Sync) -> f64 {
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        work();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    total as f64 / started.elapsed().as_secs_f64()
}

/// Argon2id verifications per second with the configured parameters, on `threads`
/// threads (the argon2 crate's own `verify_password`).
pub fn argon2_verifications(
    settings: &PasswordSettings,
    threads: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let argon2 = tessera::auth::password::argon2id(settings)?;
    let hash = argon2
        .hash_password(b"bench-password-correct-horse")
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?
        .to_string();
    let parsed = argon2::PasswordHash::new(&hash).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(per_second(threads, duration, || {
        assert!(
            argon2
                .verify_password(b"bench-password-correct-horse", &parsed)
                .is_ok()
        );
    }))
}

/// Raw signatures and verifications per second with the server's signing key, over a
/// message the size of a real access token's header and claims.
pub fn sign_and_verify(settings: &Settings, duration: Duration) -> anyhow::Result<(f64, f64)> {
    let ring = KeyStore::from_settings(settings)?.load()?;
    let key = &ring.signing;
    let alg = tessera::auth::keys::jwt_algorithm(key.alg);
    let message = concat!(
        "eyJhbGciOiJFUzI1NiIsImtpZCI6IjAxOTM0YzU2LTc4OWEtN2JjZC1lZjAxLTIzNDU2Nzg5YWJjZCIsInR5cCI6ImF0K2p3dCJ9.",
        "eyJpc3MiOiJodHRwOi8vMTI3LjAuMC4xOjgwODAiLCJzdWIiOiIwMTkzNGM1Ni03ODlhLTdiY2QtZWYwMS0yMzQ1Njc4OWFiY2QiLCJhdWQiOiJ0ZXNzZXJhIiwiZXhwIjoxNzY0MDAwOTAwLCJpYXQiOjE3NjQwMDAwMDAsIm5iZiI6MTc2NDAwMDAwMCwianRpIjoiMDE5MzRjNTYtNzg5YS03YmNkLWVmMDEtMjM0NTY3ODlhYmNkIiwic2lkIjoiMDE5MzRjNTYtNzg5YS03YmNkLWVmMDEtMjM0NTY3ODlhYmNkIiwicm9sZXMiOltdfQ"
    )
    .as_bytes();
    let signature = jsonwebtoken::crypto::sign(message, &key.encoding, alg)?;
    anyhow::ensure!(
        jsonwebtoken::crypto::verify(&signature, message, &key.decoding, alg)?,
        "the signing key does not verify its own signature"
    );
    let signs = per_second_on_all_cores(duration, || {
        assert!(jsonwebtoken::crypto::sign(message, &key.encoding, alg).is_ok());
    });
    let verifies = per_second_on_all_cores(duration, || {
        assert!(
            jsonwebtoken::crypto::verify(&signature, message, &key.decoding, alg).unwrap_or(false)
        );
    });
    Ok((signs, verifies))
}

/// Tessera's refresh statement (rotate one token, touch the session, insert the
/// successor, prune the chain and write the audit row if `audit.refresh`, in one statement) run directly on the store, one task
/// per chain, with the server's pool size: the database's ceiling for `/refresh`.
pub async fn bare_refresh(
    settings: &Settings,
    chains: Vec<String>,
    duration: Duration,
    warmup: Duration,
) -> anyhow::Result<Outcome> {
    let store = Backend::from_settings(&settings.database)?.connect_lazy(&settings.database)?;
    let idle_ttl_secs = settings.tokens.refresh_idle_ttl_secs as i64;
    let grace_secs = settings.tokens.refresh_reuse_grace_secs as i64;
    let audit = settings.audit.refresh;
    let client = Arc::new(ClientInfo {
        ip: Some("127.0.0.1".to_owned()),
        user_agent: Some("tessera-bench".to_owned()),
        request_id: None,
    });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for first in chains {
        let store = store.clone();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::new();
            let mut current = RefreshToken::parse(&first)
                .ok_or_else(|| anyhow::anyhow!("a login gave a malformed refresh token"))?;
            while start.elapsed() < duration {
                let began = Instant::now();
                let successor = current.successor();
                let rotation = Rotation {
                    token_hash: &current.hash(),
                    successor_hash: &successor.hash(),
                    successor_sealed: &current.seal_successor(&successor),
                    idle_ttl_secs,
                    grace_secs,
                    audit,
                    bind_user_agent: false,
                    idle_by_role: "{}",
                    absolute_by_role: "{}",
                    client: &client,
                };
                let rotated = store.rotate_refresh(rotation).await;
                let ok = matches!(rotated, Ok(Some(_)));
                if began.duration_since(start) >= warmup {
                    stats.record(ok, 0, began.elapsed().as_micros() as u64);
                }
                if !ok {
                    anyhow::bail!("the bare rotation failed: {rotated:?}");
                }
                current = successor;
            }
            anyhow::Ok(stats)
        }));
    }
    let mut stats = Stats::new();
    for task in tasks {
        stats.merge(&task.await??);
    }
    let secs = start.elapsed().saturating_sub(warmup).as_secs_f64();
    Ok(Outcome {
        by_kind: [("bare refresh", stats)].into_iter().collect(),
        secs,
    })
}

/// Resident memory of a process, in KiB, from /proc (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident KiB of the process's memory maps of `file` and of its `-shm` companion, from
/// /proc (Linux). The SQLite store reads its database through a memory map: those pages
/// are the kernel's page cache of the file, counted in VmRSS, where the PostgreSQL
/// mode's database pages sit in PostgreSQL's processes instead.
pub fn mapped_kib(pid: u32, file: &std::path::Path) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let name = file.to_str()?;
    let shm = format!("{name}-shm");
    let (mut counting, mut kib) = (false, 0);
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            if counting {
                kib += rss
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()?;
            }
        } else if line
            .split(' ')
            .next()
            .is_some_and(|range| range.contains('-') && !range.ends_with(':'))
        {
            // A mapping's header: "start-end perms offset dev inode   path".
            counting = line.ends_with(name) || line.ends_with(&shm);
        }
    }
    Some(kib)
}
