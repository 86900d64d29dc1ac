//! Argon2id hashing on a bounded pool of threads, off the async workers.
//!
//! A hash costs ~20 ms of CPU and 19 MiB of memory, so hashing on the async workers
//! would stall every other request, and an unbounded queue would let a login flood
//! exhaust memory. The pool has about one thread per core and a bounded queue; when the
//! queue is full the caller gets [`HashError::Busy`] at once (503 + `Retry-After`).
//! Unknown users are checked against a dummy hash made with the same parameters, so
//! they cost the same time as known ones.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version};
use tokio::sync::oneshot;

use crate::config::PasswordSettings;
use crate::domain::Password;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("password hashing pool is full")]
    Busy,
    #[error("password hashing failed: {0:#}")]
    Failed(anyhow::Error),
}

/// The result of a password check.
#[derive(Debug)]
pub struct Verification {
    pub matches: bool,
    /// A new hash with the configured parameters, when the stored one is outdated.
    pub upgraded_hash: Option<String>,
}

/// True when `hash` is not argon2id v19 with exactly the configured parameters.
fn is_outdated(argon2: &Argon2<'_>, hash: &str) -> bool {
    let Ok(phc) = PasswordHash::new(hash) else {
        return true;
    };
    let current = argon2.params();
    let same = phc.algorithm.as_str() == "argon2id"
        && phc.version == Some(0x13)
        && Params::try_from(&phc).is_ok_and(|p| {
            p.m_cost() == current.m_cost()
                && p.t_cost() == current.t_cost()
                && p.p_cost() == current.p_cost()
        });
    !same
}

pub struct PasswordHasherPool {
    queue: SyncSender<Job>,
    argon2: Arc<Argon2<'static>>,
    dummy_hash: Arc<str>,
    /// Jobs taken up by a thread.
    jobs: Arc<AtomicU64>,
    /// Argon2 evaluations actually computed (hashes and verifications).
    runs: Arc<AtomicU64>,
}

/// Argon2id (v19) with the configured parameters.
pub fn argon2id(settings: &PasswordSettings) -> anyhow::Result<Argon2<'static>> {
    let params = Params::new(
        settings.memory_kib,
        settings.iterations,
        settings.parallelism,
        None,
    )
    .map_err(|e| anyhow::anyhow!("invalid argon2 parameters: {e}"))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

impl PasswordHasherPool {
    pub fn new(settings: &PasswordSettings) -> anyhow::Result<Self> {
        let argon2 = Arc::new(argon2id(settings)?);
        let workers = if settings.workers == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            settings.workers
        };
        let capacity = if settings.queue == 0 {
            workers * 16
        } else {
            settings.queue
        };
        let (queue, rx) = sync_channel::<Job>(capacity);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || worker(rx))
                .context("cannot start password hashing threads")?;
        }
        let mut random = [0u8; 24];
        aws_lc_rs::rand::fill(&mut random)
            .map_err(|_| anyhow::anyhow!("random generator failed"))?;
        let dummy_hash = argon2
            .hash_password(&random)
            .map_err(|e| anyhow::anyhow!("argon2 self-test failed: {e}"))?
            .to_string();
        Ok(PasswordHasherPool {
            queue,
            argon2,
            dummy_hash: dummy_hash.into(),
            jobs: Arc::new(AtomicU64::new(0)),
            runs: Arc::new(AtomicU64::new(0)),
        })
    }

    /// How many argon2 evaluations (hashes and verifications, dummy ones included) the
    /// pool has computed: lets tests see that throttled logins cost none and that unknown
    /// users cost one, like everybody else.
    pub fn argon2_runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    fn jobs_started(&self) -> u64 {
        self.jobs.load(Ordering::Relaxed)
    }

    /// Hashes a new password into a PHC string.
    pub async fn hash(&self, password: Password) -> Result<String, HashError> {
        let (argon2, runs) = (self.argon2.clone(), self.runs.clone());
        self.run(move || {
            counted(&runs, || argon2.hash_password(password.expose().as_bytes()))
                .map(|h| h.to_string())
                .map_err(|e| HashError::Failed(anyhow::anyhow!("{e}")))
        })
        .await?
    }

    /// Checks a password against a stored hash, or against the dummy hash when there is
    /// no user, so both paths take the same time. Constant-time comparison is argon2's.
    /// When a real hash matches but was made with other parameters than the configured
    /// ones, the same job also computes its replacement, so hashes follow the
    /// configuration as users log in.
    pub async fn verify(
        &self,
        password: Password,
        hash: Option<String>,
    ) -> Result<Verification, HashError> {
        let (argon2, runs) = (self.argon2.clone(), self.runs.clone());
        let is_real = hash.is_some();
        let hash: Arc<str> = hash.map_or_else(|| self.dummy_hash.clone(), Arc::from);
        self.run(move || {
            let pw = password.expose().as_bytes();
            // Always verify, even against the dummy hash: that is the point of it.
            let matches = counted(&runs, || argon2.verify_password(pw, &*hash).is_ok()) && is_real;
            let upgraded_hash = (matches && is_outdated(&argon2, &hash))
                .then(|| {
                    counted(&runs, || {
                        argon2.hash_password(pw).ok().map(|h| h.to_string())
                    })
                })
                .flatten();
            Verification {
                matches,
                upgraded_hash,
            }
        })
        .await
    }

    /// Queues `f` without waiting; refuses at once when the queue is full.
    fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<oneshot::Receiver<T>, HashError> {
        let (tx, rx) = oneshot::channel();
        let jobs = self.jobs.clone();
        let job: Job = Box::new(move || {
            jobs.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send(f());
        });
        match self.queue.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(HashError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(HashError::Failed(anyhow::anyhow!(
                "hashing threads are gone"
            ))),
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let rx = self.submit(f)?;
        rx.await
            .map_err(|_| HashError::Failed(anyhow::anyhow!("hashing job was dropped")))
    }
}

/// Runs one argon2 evaluation and counts it, so the count cannot drift from the work.
fn counted<T>(runs: &AtomicU64, evaluation: impl FnOnce() -> T) -> T {
    let out = evaluation();
    runs.fetch_add(1, Ordering::Relaxed);
    out
}

fn worker(rx: Arc<Mutex<Receiver<Job>>>) {
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(queue: usize) -> PasswordSettings {
        PasswordSettings {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
            allow_weak: true,
            workers: 1,
            queue,
        }
    }

    fn pool(queue: usize) -> PasswordHasherPool {
        PasswordHasherPool::new(&settings(queue)).unwrap()
    }

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_never_match() {
        let pool = pool(4);
        let hash = pool
            .hash(Password::parse_new("correct horse".into()).unwrap())
            .await
            .unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"));
        let ok = pool.verify(
            Password::parse_existing("correct horse".into()).unwrap(),
            Some(hash.clone()),
        );
        let ok = ok.await.unwrap();
        assert!(ok.matches);
        assert!(
            ok.upgraded_hash.is_none(),
            "current parameters: nothing to upgrade"
        );
        let wrong = pool.verify(
            Password::parse_existing("Correct horse".into()).unwrap(),
            Some(hash),
        );
        assert!(!wrong.await.unwrap().matches);
        let nobody = pool.verify(
            Password::parse_existing("correct horse".into()).unwrap(),
            None,
        );
        assert!(!nobody.await.unwrap().matches);
        assert_eq!(
            pool.argon2_runs(),
            4,
            "the unknown user cost a verification too"
        );
    }

    #[tokio::test]
    async fn matching_hashes_with_other_parameters_get_an_upgrade() {
        let old = PasswordHasherPool::new(&PasswordSettings {
            memory_kib: 512,
            ..settings(4)
        })
        .unwrap();
        let hash = old
            .hash(Password::parse_new("correct horse".into()).unwrap())
            .await
            .unwrap();
        let pool = pool(4);
        let check = |pw: &str| {
            pool.verify(
                Password::parse_existing(pw.into()).unwrap(),
                Some(hash.clone()),
            )
        };
        let wrong = check("wrong horse").await.unwrap();
        assert!(
            !wrong.matches && wrong.upgraded_hash.is_none(),
            "no upgrade without the password"
        );
        let right = check("correct horse").await.unwrap();
        assert!(right.matches);
        let upgraded = right.upgraded_hash.expect("an upgraded hash");
        assert!(
            upgraded.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"),
            "{upgraded}"
        );
        let again = pool.verify(
            Password::parse_existing("correct horse".into()).unwrap(),
            Some(upgraded),
        );
        assert!(again.await.unwrap().matches);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let pool = pool(1);
        // Block the only worker, then fill the one queue slot.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let blocker = pool.submit(move || release_rx.recv().ok()).unwrap();
        while pool.jobs_started() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let queued = pool.submit(|| ()).unwrap();
        assert!(matches!(pool.submit(|| ()), Err(HashError::Busy)));
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        queued.await.unwrap();
        assert!(pool.submit(|| ()).is_ok(), "accepts again once drained");
    }
}
