//! Argon2id hashing on a bounded pool of threads, off the async workers.
//!
//! A hash costs ~20 ms of CPU and 19 MiB of memory, so hashing on the async workers
//! would stall every other request, and an unbounded queue would let a login flood
//! exhaust memory. The pool has one thread per core, of which all but one hash only
//! while no other request is in flight or has been for 20 ms (so logins alone get every
//! core, and a flood still leaves a core to everything else as soon as anything else
//! comes; the threads also run at the lowest priority), each keeping its argon2 memory
//! between jobs, and a bounded queue; when the queue is full the
//! caller gets [`HashError::Busy`] at once (503 + `Retry-After`).
//! A caller takes its place in the pool ([`PasswordHasherPool::reserve`]) before doing
//! any other work for the attempt, so that under a login flood the attempts the pool
//! cannot take are refused before they cost a Redis or database round trip (which the
//! refreshes and token checks of everyone else need).
//! Unknown users are checked against a dummy hash made with the same parameters, so
//! they cost the same time as known ones. After the parameters change, stored hashes
//! keep their old ones until their user logs in, so a dormant account would answer in
//! another time than an unknown email (faster after a raise, slower after a cut). So
//! while such hashes are around, every check does the same two evaluations, one with
//! each set of parameters (see [`Outdated`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use argon2::{
    Algorithm, Argon2, Block, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version,
};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

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

/// Whether `hash` is an argon2 PHC string this server can verify passwords against
/// (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`), e.g. one a user migration brings in.
pub fn is_argon2_hash(hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|phc| {
        matches!(phc.algorithm.as_str(), "argon2id" | "argon2i" | "argon2d")
            && phc.hash.is_some()
            && Params::try_from(&phc).is_ok()
    })
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

/// The other parameters stored hashes were last seen with, and a dummy hash made with
/// them, so that every check does the same real work while such hashes are around: one
/// evaluation with the configured parameters and one with the outdated ones.
///
/// - unknown email: the configured dummy, then the outdated dummy;
/// - stored hash with the configured parameters: it, then the outdated dummy;
/// - stored hash with outdated parameters: it, then the configured dummy.
///
/// Work, not waiting: both sides run the same evaluations on the same threads under the
/// same load, which no estimate of a hash's time would match as closely. Forgotten a
/// day after the last check of an outdated hash (logins then cost one evaluation
/// again). With several generations of parameters in the database, the most recently
/// seen one is matched.
struct Outdated {
    latest: Mutex<Option<OutdatedDummy>>,
    epoch: std::time::Instant,
}

#[derive(Clone)]
struct OutdatedDummy {
    params: Params,
    hash: Arc<str>,
    /// When a hash with these parameters was last checked (since `epoch`).
    seen: std::time::Duration,
}

/// How long the outdated parameters count after the last check of such a hash.
const OUTDATED_MEMORY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl Outdated {
    fn new() -> Self {
        Outdated {
            latest: Mutex::new(None),
            epoch: std::time::Instant::now(),
        }
    }

    /// The outdated dummy to check against as well, if outdated hashes are recent.
    fn dummy(&self) -> Option<Arc<str>> {
        let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        latest
            .as_ref()
            .filter(|d| self.epoch.elapsed() <= d.seen + OUTDATED_MEMORY)
            .map(|d| d.hash.clone())
    }

    /// A hash with `params` was just checked: remember them (making their dummy, one
    /// evaluation, when they are new).
    fn seen(&self, params: Params, runs: &AtomicU64) {
        let now = self.epoch.elapsed();
        {
            let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(d) = latest.as_mut().filter(|d| d.params == params) {
                d.seen = now;
                return;
            }
        }
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let mut random = [0u8; 24];
        if aws_lc_rs::rand::fill(&mut random).is_err() {
            return;
        }
        let Ok(hash) = counted(runs, || argon2.hash_password(&random)) else {
            return;
        };
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(OutdatedDummy {
            params,
            hash: hash.to_string().into(),
            seen: now,
        });
    }
}

/// The parameters of `hash`, when it is argon2 with other ones than the configured.
fn outdated_params(argon2: &Argon2<'_>, hash: &str) -> Option<Params> {
    if !is_outdated(argon2, hash) {
        return None;
    }
    PasswordHash::new(hash)
        .ok()
        .and_then(|phc| Params::try_from(&phc).ok())
}

/// A place in the pool (a thread or a queue slot), held from before an attempt's
/// database and Redis work until its argon2 job has run.
pub struct HashSlot {
    /// Released when dropped: after the job ran, or at once if the attempt stops first.
    _permit: OwnedSemaphorePermit,
}

pub struct PasswordHasherPool {
    queue: SyncSender<Job>,
    /// Places: threads plus queue slots.
    slots: Arc<Semaphore>,
    argon2: Arc<Argon2<'static>>,
    dummy_hash: Arc<str>,
    /// Jobs taken up by a thread.
    jobs: Arc<AtomicU64>,
    /// Argon2 evaluations actually computed (hashes and verifications).
    runs: Arc<AtomicU64>,
    outdated: Arc<Outdated>,
    activity: Arc<Activity>,
    /// Queue depth, wait and hash time (see [`PasswordHasherPool::measured`]).
    metrics: Arc<crate::metrics::Metrics>,
}

/// Threads that hash: `password.workers` of them, all the time; or by default
/// (`password.workers = 0`) one per core, of which one hashes all the time and the
/// others only while nothing else is asked of the server ([`Activity`]): a login flood
/// alone gets every core, while refreshes and token checks arriving get theirs back at
/// once (with every core hashing regardless, their p99 rose 10-20× under a flood even
/// at the lowest priority; with one core left it stayed within 2×, docs/performance.md).
pub fn hashing_threads(settings: &PasswordSettings) -> usize {
    match settings.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// How many of [`hashing_threads`] hash only while the server is otherwise quiet.
fn opportunistic_threads(settings: &PasswordSettings) -> usize {
    match settings.workers {
        0 => hashing_threads(settings).saturating_sub(1),
        _ => 0,
    }
}

/// Whether anything but password checks is being asked of the server: requests in
/// flight and when the last one came or went. The HTTP layer reports every request
/// but the hashing ones (login, registration, password change).
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicU64,
    last_ms: AtomicU64,
    epoch: std::time::Instant,
}

/// How long the server must have been quiet before an opportunistic thread takes a job.
const QUIET: std::time::Duration = std::time::Duration::from_millis(20);

impl Activity {
    fn new() -> Self {
        Activity {
            in_flight: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A request starts; it ends when the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
        ActivityGuard(self.clone())
    }

    fn quiet(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && self
                .now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed))
                >= QUIET.as_millis() as u64
    }
}

/// See [`Activity::enter`].
pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.last_ms.store(self.0.now_ms(), Ordering::Relaxed);
    }
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
        let workers = hashing_threads(settings);
        let opportunistic = opportunistic_threads(settings);
        let activity = Arc::new(Activity::new());
        let capacity = if settings.queue == 0 {
            workers * 64
        } else {
            settings.queue
        };
        // Never full: a job needs a slot, and there are no more slots than this.
        let (queue, rx) = sync_channel::<Job>(capacity + workers);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let rx = rx.clone();
            let low_priority = settings.low_priority;
            // The last `opportunistic` threads wait for a quiet server.
            let quiet_only = (i >= workers - opportunistic).then(|| activity.clone());
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    if low_priority {
                        lower_priority();
                    }
                    match quiet_only {
                        None => worker(rx),
                        Some(activity) => opportunistic_worker(rx, &activity),
                    }
                })
                .context("cannot start password hashing threads")?;
        }
        let mut random = [0u8; 24];
        aws_lc_rs::rand::fill(&mut random)
            .map_err(|_| anyhow::anyhow!("random generator failed"))?;
        let dummy_hash = argon2
            .hash_password(&random)
            .map_err(|e| anyhow::anyhow!("argon2 self-test failed: {e}"))?
            .to_string();
        let outdated = Arc::new(Outdated::new());
        Ok(PasswordHasherPool {
            queue,
            slots: Arc::new(Semaphore::new(capacity + workers)),
            argon2,
            dummy_hash: dummy_hash.into(),
            jobs: Arc::new(AtomicU64::new(0)),
            runs: Arc::new(AtomicU64::new(0)),
            outdated,
            activity,
            metrics: Default::default(),
        })
    }

    /// Reports to `metrics` (the server's).
    pub fn measured(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// What the HTTP layer reports other requests to (see [`Activity`]).
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
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

    /// Takes a place in the pool, or refuses at once when every thread is busy and
    /// the queue is full.
    pub fn reserve(&self) -> Result<HashSlot, HashError> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map(|permit| HashSlot { _permit: permit })
            .map_err(|_| HashError::Busy)
    }

    /// Hashes a new password into a PHC string.
    pub async fn hash(&self, password: Password) -> Result<String, HashError> {
        let (argon2, runs) = (self.argon2.clone(), self.runs.clone());
        self.run(self.reserve()?, move || {
            counted(&runs, || {
                hash_in_thread_memory(&argon2, password.expose().as_bytes())
            })
            .map_err(HashError::Failed)
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
        slot: HashSlot,
        password: Password,
        hash: Option<String>,
    ) -> Result<Verification, HashError> {
        let (argon2, runs) = (self.argon2.clone(), self.runs.clone());
        let is_real = hash.is_some();
        let hash: Arc<str> = hash.map_or_else(|| self.dummy_hash.clone(), Arc::from);
        let (dummy, outdated) = (self.dummy_hash.clone(), self.outdated.clone());
        let verification = self
            .run(slot, move || {
                let pw = password.expose().as_bytes();
                let stored_params = outdated_params(&argon2, &hash);
                // Always verify, even against the dummy hash: that is the point of it.
                let matches =
                    counted(&runs, || verify_in_thread_memory(&argon2, pw, &hash)) && is_real;
                // The other half of the same work for everyone (see `Outdated`).
                let other = match &stored_params {
                    Some(_) => Some(dummy),
                    None => outdated.dummy(),
                };
                if let Some(other) = other {
                    counted(&runs, || verify_in_thread_memory(&argon2, pw, &other));
                }
                let upgraded_hash = (matches && stored_params.is_some())
                    .then(|| counted(&runs, || hash_in_thread_memory(&argon2, pw).ok()))
                    .flatten();
                if let Some(params) = stored_params {
                    outdated.seen(params, &runs);
                }
                Verification {
                    matches,
                    upgraded_hash,
                }
            })
            .await?;
        Ok(verification)
    }

    /// Queues `f` in the place `slot` holds; the place is freed when `f` has run.
    fn submit<T: Send + 'static>(
        &self,
        slot: HashSlot,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<oneshot::Receiver<T>, HashError> {
        let (tx, rx) = oneshot::channel();
        let jobs = self.jobs.clone();
        let metrics = self.metrics.clone();
        let queued = std::time::Instant::now();
        let job: Job = Box::new(move || {
            jobs.fetch_add(1, Ordering::Relaxed);
            let started = std::time::Instant::now();
            metrics.hash_started(started - queued);
            let _ = tx.send(f());
            metrics.hash_done(started.elapsed());
            drop(slot);
        });
        self.metrics.hash_queued();
        let sent = self.queue.try_send(job);
        if sent.is_err() {
            self.metrics.hash_not_queued();
        }
        match sent {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(HashError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(HashError::Failed(anyhow::anyhow!(
                "hashing threads are gone"
            ))),
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        slot: HashSlot,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let rx = self.submit(slot, f)?;
        rx.await
            .map_err(|_| HashError::Failed(anyhow::anyhow!("hashing job was dropped")))
    }
}

thread_local! {
    /// A hashing thread's argon2 working memory, kept from one verification to the next.
    /// Allocating and zeroing 19 MiB per login costs ~4,900 page faults and an munmap
    /// (whose TLB shootdown interrupts every core), and glibc then leaves freed blocks
    /// scattered over its per-thread arenas: the server grew to ~380 MB under a login
    /// flood. With the memory kept, it stays at threads × m (docs/performance.md).
    static MEMORY: std::cell::RefCell<Vec<Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `argon2.hash_password(password)` (a random 16-byte salt, a 32-byte output, the PHC
/// string), computed in this thread's kept memory.
fn hash_in_thread_memory(argon2: &Argon2<'_>, password: &[u8]) -> anyhow::Result<String> {
    use argon2::password_hash::phc::{Output, ParamsString, Salt};
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| anyhow::anyhow!("random generator failed"))?;
    let mut output = [0u8; 32];
    let blocks = argon2.params().block_count();
    MEMORY
        .with_borrow_mut(|memory| {
            memory.resize(blocks.max(memory.len()), Block::new());
            argon2.hash_password_into_with_memory(
                password,
                &salt,
                &mut output,
                &mut memory[..blocks],
            )
        })
        .map_err(|e| anyhow::anyhow!("argon2 failed: {e}"))?;
    let phc = PasswordHash {
        algorithm: argon2::ARGON2ID_IDENT,
        version: Some(0x13),
        params: ParamsString::try_from(argon2.params()).map_err(|e| anyhow::anyhow!("{e}"))?,
        salt: Some(Salt::new(&salt).map_err(|e| anyhow::anyhow!("{e}"))?),
        hash: Some(Output::new(&output).map_err(|e| anyhow::anyhow!("{e}"))?),
    };
    Ok(phc.to_string())
}

/// `argon2.verify_password(password, hash)`, computed in this thread's kept memory
/// when the hash needs no more of it than the configured parameters (the hashes
/// Tessera makes); other hashes take the allocating path. The comparison of the
/// outputs is constant-time.
fn verify_in_thread_memory(argon2: &Argon2<'_>, password: &[u8], hash: &str) -> bool {
    let Ok(phc) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&phc.salt, &phc.hash) else {
        return false;
    };
    let params = match Params::try_from(&phc) {
        Ok(p) if p.block_count() <= argon2.params().block_count() => p,
        _ => return argon2.verify_password(password, hash).is_ok(),
    };
    let (Ok(algorithm), Ok(version)) = (
        Algorithm::try_from(phc.algorithm.as_str()),
        Version::try_from(phc.version.unwrap_or(0x13)),
    ) else {
        return false;
    };
    let blocks = params.block_count();
    let hasher = Argon2::new(algorithm, version, params);
    let mut output = [0u8; 64];
    let Some(output) = output.get_mut(..expected.len()) else {
        return false;
    };
    let computed = MEMORY.with_borrow_mut(|memory| {
        memory.resize(blocks.max(memory.len()), Block::new());
        hasher.hash_password_into_with_memory(password, salt, output, &mut memory[..blocks])
    });
    computed.is_ok() && bool::from(output.ct_eq(expected.as_bytes()))
}

/// Runs one argon2 evaluation and counts it, so the count cannot drift from the work.
fn counted<T>(runs: &AtomicU64, evaluation: impl FnOnce() -> T) -> T {
    let out = evaluation();
    runs.fetch_add(1, Ordering::Relaxed);
    out
}

/// Gives the calling thread the lowest priority of the normal scheduling policy (nice
/// 19 on Linux): any other runnable thread of the machine goes first. Needs no
/// privileges; if it fails anyway, hashing simply keeps the normal priority.
fn lower_priority() {
    use thread_priority::{ThreadPriority, set_current_thread_priority};
    if let Err(e) = set_current_thread_priority(ThreadPriority::Min) {
        tracing::warn!(error = ?e, "could not lower the priority of a hashing thread");
    }
}

/// A thread that takes a job only while the server is quiet, so that it gives its core
/// back as soon as other requests come (a job it has started runs to its end, one
/// hash; the thread runs at the lowest priority meanwhile).
fn opportunistic_worker(rx: Arc<Mutex<Receiver<Job>>>, activity: &Activity) {
    loop {
        // While quiet, look for work every millisecond (a login waiting for the steady
        // thread is what this thread is for); while busy, every 5 ms.
        let mut poll = QUIET / 4;
        if activity.quiet() {
            poll = std::time::Duration::from_millis(1);
            // Never wait for a job: one taken must be taken while quiet (checked again
            // under the lock, which the steady thread may have held for a while).
            let job = match rx.lock() {
                Ok(rx) if activity.quiet() => rx.try_recv(),
                Ok(_) => Err(std::sync::mpsc::TryRecvError::Empty),
                Err(_) => return,
            };
            match job {
                Ok(job) => {
                    job();
                    continue;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
            }
        }
        std::thread::sleep(poll);
    }
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
            low_priority: true,
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
            pool.reserve().unwrap(),
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
            pool.reserve().unwrap(),
            Password::parse_existing("Correct horse".into()).unwrap(),
            Some(hash),
        );
        assert!(!wrong.await.unwrap().matches);
        let nobody = pool.verify(
            pool.reserve().unwrap(),
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
                pool.reserve().unwrap(),
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
            pool.reserve().unwrap(),
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
        let blocker = pool
            .submit(pool.reserve().unwrap(), move || release_rx.recv().ok())
            .unwrap();
        while pool.jobs_started() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let queued = pool.submit(pool.reserve().unwrap(), || ()).unwrap();
        assert!(matches!(pool.reserve(), Err(HashError::Busy)));
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        queued.await.unwrap();
        assert!(pool.reserve().is_ok(), "accepts again once drained");
    }

    #[test]
    fn verifying_in_kept_memory_agrees_with_the_argon2_crate() {
        let argon2 = argon2id(&settings(1)).unwrap();
        let smaller = argon2id(&PasswordSettings {
            memory_kib: 512,
            ..settings(1)
        })
        .unwrap();
        let larger = argon2id(&PasswordSettings {
            memory_kib: 2048,
            ..settings(1)
        })
        .unwrap();
        for maker in [&argon2, &smaller, &larger] {
            let hash = maker.hash_password(b"correct horse").unwrap().to_string();
            // Twice each, so the second run uses memory left by the first.
            for _ in 0..2 {
                for pw in [
                    &b"correct horse"[..],
                    b"correct horsf",
                    b"",
                    b"correct horse ",
                ] {
                    assert_eq!(
                        verify_in_thread_memory(&argon2, pw, &hash),
                        argon2.verify_password(pw, &*hash).is_ok(),
                        "{hash}"
                    );
                }
                assert!(verify_in_thread_memory(&argon2, b"correct horse", &hash));
            }
        }
        assert!(!verify_in_thread_memory(&argon2, b"x", "not a phc string"));
        // Hashes made in kept memory verify with the crate, and differ by salt.
        let mine = hash_in_thread_memory(&argon2, b"correct horse").unwrap();
        assert!(mine.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{mine}");
        assert!(argon2.verify_password(b"correct horse", &*mine).is_ok());
        assert!(argon2.verify_password(b"correct horsf", &*mine).is_err());
        assert_ne!(
            mine,
            hash_in_thread_memory(&argon2, b"correct horse").unwrap()
        );
        // Another output under the same salt: first character of the output changed.
        let good = argon2.hash_password(b"correct horse").unwrap().to_string();
        let at = good.rfind('$').unwrap() + 1;
        let other = if good[at..].starts_with('A') {
            "B"
        } else {
            "A"
        };
        let tampered = format!("{}{other}{}", &good[..at], &good[at + 1..]);
        assert!(verify_in_thread_memory(&argon2, b"correct horse", &good));
        assert!(!verify_in_thread_memory(
            &argon2,
            b"correct horse",
            &tampered
        ));
    }

    /// Runs `n` jobs of 150 ms at once; returns how many ran at the same time at most.
    async fn most_at_once(pool: &PasswordHasherPool, n: usize) -> usize {
        use std::sync::atomic::AtomicUsize;
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jobs = (0..n).map(|_| {
            let (running, most) = (running.clone(), most.clone());
            pool.run(pool.reserve().unwrap(), move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(150));
                running.fetch_sub(1, Ordering::SeqCst);
            })
        });
        for done in futures_util::future::join_all(jobs).await {
            done.unwrap();
        }
        most.load(Ordering::SeqCst)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn by_default_every_core_hashes_but_only_one_while_other_requests_run() {
        let mut adaptive = settings(0);
        adaptive.workers = 0;
        let threads = hashing_threads(&adaptive);
        if threads < 2 {
            eprintln!("skipped: one core, nothing to share");
            return;
        }
        let pool = PasswordHasherPool::new(&adaptive).unwrap();
        tokio::time::sleep(QUIET * 2).await;
        assert_eq!(
            most_at_once(&pool, threads).await,
            threads,
            "quiet: every core"
        );
        let busy = pool.activity().enter();
        assert_eq!(most_at_once(&pool, threads).await, 1, "busy: one thread");
        drop(busy);
        tokio::time::sleep(QUIET * 2).await;
        assert_eq!(most_at_once(&pool, threads).await, threads, "quiet again");
        // A fixed count is just that.
        let mut fixed = settings(0);
        fixed.workers = 2;
        let pool = PasswordHasherPool::new(&fixed).unwrap();
        let _busy = pool.activity().enter();
        assert_eq!(most_at_once(&pool, 2).await, 2);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn hashing_threads_run_at_the_lowest_priority() {
        let _pool = pool(1);
        let nice_of_hashing_threads = || -> Vec<i64> {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|task| {
                    let dir = task.ok()?.path();
                    let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
                    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                    // Fields after "(comm)": state is field 3, nice field 19.
                    let after = &stat[stat.rfind(')')? + 1..];
                    let nice = after.split_whitespace().nth(16)?.parse().ok()?;
                    comm.starts_with("argon2-").then_some(nice)
                })
                .collect()
        };
        // The thread lowers its own priority as it starts.
        let mut seen = nice_of_hashing_threads();
        for _ in 0..100 {
            if !seen.is_empty() && seen.iter().all(|&n| n == 19) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            seen = nice_of_hashing_threads();
        }
        assert!(!seen.is_empty(), "no hashing thread found");
        assert!(seen.iter().all(|&n| n == 19), "nice values {seen:?}");
    }

    #[tokio::test]
    async fn a_reserved_place_counts_before_its_job_is_queued() {
        let pool = pool(1);
        let held = [pool.reserve().unwrap(), pool.reserve().unwrap()];
        assert!(matches!(pool.reserve(), Err(HashError::Busy)));
        drop(held);
        assert!(
            pool.reserve().is_ok(),
            "a dropped reservation frees its place"
        );
    }
}
