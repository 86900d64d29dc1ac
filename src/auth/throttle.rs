//! Login throttling with `governor`: one keyed limiter per client IP, one per account.
//! These are per-process burst limiters; the per-account budget that holds across
//! instances is [`crate::store::login_failures`].
//!
//! The account key is the normalized email as submitted, whether or not the account
//! exists, so a 429 says nothing about which accounts exist. Both checks run before
//! any password hashing. Idle keys are dropped periodically so memory stays bounded.
//!
//! A throttled attempt is audited, but at most once a minute per key and process, so
//! a flood cannot turn into a flood of audit rows.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::LoginSettings;

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

pub struct LoginThrottle {
    per_ip: Keyed<IpAddr>,
    per_account: Keyed<String>,
    audited: Keyed<String>,
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
        LoginThrottle {
            per_ip: RateLimiter::keyed(quota(settings.per_ip_per_minute)),
            per_account: RateLimiter::keyed(quota(settings.per_account_per_minute)),
            audited: RateLimiter::keyed(quota(1)),
            clock: DefaultClock::default(),
        }
    }

    /// Counts one attempt from `ip`.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Throttled> {
        self.per_ip.check_key(&ip).map_err(|not_until| Throttled {
            retry_after_secs: secs(not_until.wait_time_from(self.clock.now())),
            by_account: false,
        })
    }

    /// Counts one attempt at login as `account` (already normalized).
    pub fn check_account(&self, account: &str) -> Result<(), Throttled> {
        // The key is owned by the limiter; cap its size so a flood of huge emails
        // cannot make the table large (emails are at most 254 bytes after parsing).
        self.per_account
            .check_key(&account.to_owned())
            .map_err(|not_until| Throttled {
                retry_after_secs: secs(not_until.wait_time_from(self.clock.now())),
                by_account: true,
            })
    }

    /// Whether a throttled attempt on `key` should be audited (once a minute per key).
    pub fn should_audit(&self, key: &str) -> bool {
        self.audited.check_key(&key.to_owned()).is_ok()
    }

    /// Forgets keys whose buckets are full again; run periodically.
    pub fn purge(&self) {
        self.per_ip.retain_recent();
        self.per_account.retain_recent();
        self.audited.retain_recent();
        self.per_ip.shrink_to_fit();
        self.per_account.shrink_to_fit();
        self.audited.shrink_to_fit();
    }
}

/// Whole seconds to wait, rounded up (a `Retry-After` value).
pub(crate) fn secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_per_key_and_say_when_to_retry() {
        let t = LoginThrottle::new(&LoginSettings {
            per_ip_per_minute: 2,
            per_account_per_minute: 1,
            free_failures: 5,
            delay_base_secs: 1,
            delay_max_secs: 300,
            failure_window_secs: 900,
            device_ttl_secs: 86400,
            device_free_failures: 10,
        });
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
}
