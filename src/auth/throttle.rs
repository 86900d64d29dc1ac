//! Login throttling with `governor`: one keyed limiter per client IP, one per account.
//! These are per-process burst limiters; the per-account budget that holds across
//! instances is [`crate::store::FailureBudgets`].
//!
//! The account key is the normalized email as submitted, whether or not the account
//! exists, so a 429 says nothing about which accounts exist. Both checks run before
//! any password hashing. Idle keys are dropped periodically so memory stays bounded.
//!
//! A throttled attempt is audited, but at most once a minute per key and process, so
//! a flood cannot turn into a flood of audit rows.

use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::LoginSettings;

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

/// A keyed limiter whose table never holds much more than `max_keys` keys. Every
/// request with a new key (an address, an email) adds one, so a flood of distinct keys
/// would otherwise grow it until the next purge. When it passes the bound, keys whose
/// buckets are full again are dropped at once; if that is not enough (a flood of keys
/// all seen within the refill period), the table starts afresh: the limits restart for
/// everyone, which costs an attacker's victims nothing the per-account budget in Redis
/// does not still hold, while memory stays bounded.
struct Bounded<K: Hash + Eq + Clone> {
    quota: Quota,
    max_keys: usize,
    limiter: RwLock<Keyed<K>>,
    checks: AtomicU64,
}

/// The table's size is looked at every this many checks, so it holds at most
/// `max_keys` plus this many keys.
const SIZE_CHECK_EVERY: u64 = 64;

impl<K: Hash + Eq + Clone> Bounded<K> {
    fn new(quota: Quota, max_keys: usize) -> Self {
        Bounded {
            quota,
            max_keys: max_keys.max(1),
            limiter: RwLock::new(RateLimiter::keyed(quota)),
            checks: AtomicU64::new(0),
        }
    }

    fn check(&self, key: &K, clock: &DefaultClock) -> Result<(), Duration> {
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SIZE_CHECK_EVERY)
        {
            self.bound();
        }
        let limiter = self.limiter.read().unwrap_or_else(|e| e.into_inner());
        limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(clock.now()))
    }

    fn bound(&self) {
        let over = |l: &Keyed<K>| l.len() > self.max_keys;
        if !over(&self.limiter.read().unwrap_or_else(|e| e.into_inner())) {
            return;
        }
        let mut limiter = self.limiter.write().unwrap_or_else(|e| e.into_inner());
        limiter.retain_recent();
        if over(&limiter) {
            tracing::warn!(
                keys = limiter.len(),
                "login throttle table full of recent keys; starting afresh"
            );
            *limiter = RateLimiter::keyed(self.quota);
        }
        limiter.shrink_to_fit();
    }

    fn purge(&self) {
        let limiter = self.limiter.read().unwrap_or_else(|e| e.into_inner());
        limiter.retain_recent();
        limiter.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.limiter.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

pub struct LoginThrottle {
    per_ip: Bounded<IpAddr>,
    per_account: Bounded<String>,
    audited: Bounded<String>,
    ipv6_prefix_len: u8,
    clock: DefaultClock,
}

/// Which limit was hit, and when to come back.
#[derive(Debug, Clone, Copy)]
pub struct Throttled {
    pub retry_after_secs: u64,
    pub by_account: bool,
}

impl LoginThrottle {
    pub fn new(settings: &LoginSettings) -> Self {
        let quota = |n: u32| Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        let max = settings.max_tracked_keys;
        LoginThrottle {
            per_ip: Bounded::new(quota(settings.per_ip_per_minute), max),
            per_account: Bounded::new(quota(settings.per_account_per_minute), max),
            audited: Bounded::new(quota(1), max),
            ipv6_prefix_len: settings.ipv6_prefix_len,
            clock: DefaultClock::default(),
        }
    }

    /// The bucket an address counts in: an IPv4 address (also IPv4-mapped IPv6) as
    /// itself, an IPv6 address by its first `login.ipv6_prefix_len` bits, since one
    /// host or customer usually holds a whole /64 (2^64 addresses, one bucket).
    pub fn ip_key(&self, ip: IpAddr) -> IpAddr {
        ip_bucket(ip, self.ipv6_prefix_len)
    }

    /// Counts one attempt from `ip`.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Throttled> {
        self.per_ip
            .check(&self.ip_key(ip), &self.clock)
            .map_err(|wait| Throttled {
                retry_after_secs: secs(wait),
                by_account: false,
            })
    }

    /// Counts one attempt at login as `account` (already normalized).
    pub fn check_account(&self, account: &str) -> Result<(), Throttled> {
        self.per_account
            .check(&account.to_owned(), &self.clock)
            .map_err(|wait| Throttled {
                retry_after_secs: secs(wait),
                by_account: true,
            })
    }

    /// Whether a throttled attempt on `key` should be audited (once a minute per key).
    pub fn should_audit(&self, key: &str) -> bool {
        self.audited.check(&key.to_owned(), &self.clock).is_ok()
    }

    /// Forgets keys whose buckets are full again; run periodically.
    pub fn purge(&self) {
        self.per_ip.purge();
        self.per_account.purge();
        self.audited.purge();
    }

    /// How many keys the tables hold (IP, account, audit), to see the bound hold.
    pub fn tracked_keys(&self) -> (usize, usize, usize) {
        (
            self.per_ip.len(),
            self.per_account.len(),
            self.audited.len(),
        )
    }
}

/// The bucket an address counts in (see [`LoginThrottle::ip_key`]).
pub fn ip_bucket(ip: IpAddr, ipv6_prefix_len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6);
                let prefix = u32::from(ipv6_prefix_len.min(128));
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
        },
    }
}

/// Requests that email an address the caller names (a verification link, a password
/// reset): per client IP (bucketed as [`LoginThrottle::ip_key`]) and per address
/// (normalized), whether or not an account has it, so a 429 says nothing about which
/// accounts exist and nobody can flood someone's inbox.
pub struct MailThrottle {
    per_ip: Bounded<IpAddr>,
    per_address: Bounded<String>,
    ipv6_prefix_len: u8,
    clock: DefaultClock,
}

impl MailThrottle {
    pub fn new(settings: &crate::config::Settings) -> Self {
        let e = &settings.email;
        let quota = |n: u32| Quota::per_hour(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        let max = settings.login.max_tracked_keys;
        MailThrottle {
            per_ip: Bounded::new(quota(e.per_ip_per_hour), max),
            per_address: Bounded::new(quota(e.per_address_per_hour), max),
            ipv6_prefix_len: settings.login.ipv6_prefix_len,
            clock: DefaultClock::default(),
        }
    }

    /// Counts one request from `ip` for `address`; `Err(seconds to wait)` past either
    /// limit (then neither is charged further than the check itself).
    pub fn check(&self, ip: IpAddr, address: &str) -> Result<(), u64> {
        self.per_ip
            .check(&ip_bucket(ip, self.ipv6_prefix_len), &self.clock)
            .and_then(|()| self.per_address.check(&address.to_owned(), &self.clock))
            .map_err(secs)
    }

    pub fn purge(&self) {
        self.per_ip.purge();
        self.per_address.purge();
    }
}

/// Failed authentications per key in fixed one-minute windows, for callers that must
/// be looked up *before* their credentials are checked: a caller over the limit is
/// refused whatever it presents, so a correct guess cannot show through the refusals.
/// Successes cost a lookup and count nothing. At most `max_keys` keys are kept, as in
/// [`LoginThrottle`].
pub struct FailureLimiter {
    per_minute: u32,
    max_keys: usize,
    windows: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u32)>>,
}

const WINDOW: Duration = Duration::from_secs(60);

impl FailureLimiter {
    pub fn new(per_minute: u32, max_keys: usize) -> Self {
        FailureLimiter {
            per_minute,
            max_keys: max_keys.max(1),
            windows: Default::default(),
        }
    }

    /// `Err(seconds to wait)` when any of `keys` has used up its failures.
    pub fn check(&self, keys: &[&str]) -> Result<(), u64> {
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let wait = keys
            .iter()
            .filter_map(|k| windows.get(*k))
            .filter(|(start, n)| *n >= self.per_minute && now < *start + WINDOW)
            .map(|(start, _)| secs(*start + WINDOW - now))
            .max();
        wait.map_or(Ok(()), Err)
    }

    /// Counts one failure for each of `keys`.
    pub fn failed(&self, keys: &[&str]) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if windows.len() + keys.len() > self.max_keys {
            windows.retain(|_, (start, _)| now < *start + WINDOW);
            if windows.len() + keys.len() > self.max_keys {
                windows.clear();
            }
        }
        for key in keys {
            let entry = windows.entry((*key).to_owned()).or_insert((now, 0));
            if now >= entry.0 + WINDOW {
                *entry = (now, 0);
            }
            entry.1 += 1;
        }
    }
}

/// Whole seconds to wait, rounded up (a `Retry-After` value).
pub(crate) fn secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(per_ip: u32, per_account: u32, ipv6_prefix_len: u8) -> LoginThrottle {
        LoginThrottle::new(&LoginSettings {
            per_ip_per_minute: per_ip,
            per_account_per_minute: per_account,
            free_failures: 5,
            delay_base_secs: 1,
            delay_max_secs: 300,
            failure_window_secs: 900,
            device_ttl_secs: 86400,
            device_free_failures: 10,
            ipv6_prefix_len,
            max_tracked_keys: 100,
        })
    }

    #[test]
    fn limits_are_per_key_and_say_when_to_retry() {
        let t = throttle(2, 1, 64);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(t.check_ip(ip).is_ok());
        assert!(t.check_ip(ip).is_ok());
        let hit = t.check_ip(ip).unwrap_err();
        assert!(!hit.by_account);
        assert!(
            (1..=30).contains(&hit.retry_after_secs),
            "{}",
            hit.retry_after_secs
        );
        assert!(t.check_ip("192.0.2.2".parse().unwrap()).is_ok());
        assert!(t.check_account("a@x.io").is_ok());
        let hit = t.check_account("a@x.io").unwrap_err();
        assert!(hit.by_account && (1..=60).contains(&hit.retry_after_secs));
        assert!(t.check_account("b@x.io").is_ok());
    }

    #[test]
    fn ipv6_addresses_share_a_bucket_per_prefix_and_mapped_v4_is_v4() {
        let t = throttle(1, 1, 56);
        let key = |s: &str| t.ip_key(s.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:0:12ff::1"), "2001:db8:0:1200::");
        assert_eq!(key("2001:db8:0:1234:5678::9"), "2001:db8:0:1200::");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert!(t.check_ip("2001:db8:0:12aa::1".parse().unwrap()).is_ok());
        assert!(t.check_ip("2001:db8:0:12bb::2".parse().unwrap()).is_err());
        assert!(t.check_ip("2001:db8:0:1300::2".parse().unwrap()).is_ok());
    }

    #[test]
    fn a_flood_of_distinct_keys_keeps_the_tables_bounded() {
        let t = throttle(5, 5, 64);
        let mut largest = 0;
        for i in 0..5_000u32 {
            let _ = t.check_account(&format!("flood-{i}@example.com"));
            let _ = t.check_ip(IpAddr::from(i.to_be_bytes()));
            let (ips, accounts, _) = t.tracked_keys();
            largest = largest.max(ips).max(accounts);
        }
        assert!(largest > 100, "the flood reached the bound ({largest})");
        assert!(largest <= 100 + SIZE_CHECK_EVERY as usize, "{largest}");
    }
}
