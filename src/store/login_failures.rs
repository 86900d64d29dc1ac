//! Per-account login failure counts in Redis, shared by every instance.
//!
//! `governor` limits bursts inside one process; this is the budget that must hold
//! however many instances run. Each account (the normalized email as submitted, whether
//! or not it exists, hashed so Redis holds no email addresses) has a count of attempts
//! since its last successful login. The first `free_failures` attempts are free; after
//! that each attempt must wait `delay_base * 2^k` since the previous one (k = attempts
//! past the free ones), at most `delay_max`. The wait is bounded, so an attacker can
//! slow a victim's logins down but never lock the account; a success resets the count.
//!
//! The check and the count happen in one Lua script, atomically and by Redis's clock:
//! an attempt *reserves* its slot before the password is hashed, so concurrent attempts
//! on several instances cannot share one slot.

use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use redis::Script;
use redis::aio::ConnectionManager;

use crate::config::LoginSettings;

/// Returns 0 and counts the attempt when it may go ahead, or else the milliseconds to
/// wait. KEYS[1]: the account's hash {n: attempts, at: ms of the last}. ARGV: free
/// attempts, base delay ms, max delay ms, key lifetime secs.
const GATE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or '0')
local free = tonumber(ARGV[1])
if n >= free then
  local delay = tonumber(ARGV[3])
  local k = n - free
  if k < 40 then
    delay = math.min(delay, tonumber(ARGV[2]) * 2 ^ k)
  end
  local wait = at + delay - now
  if wait > 0 then
    return wait
  end
end
redis.call('HSET', KEYS[1], 'n', n + 1, 'at', now)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 0
";

#[derive(Clone)]
pub struct LoginFailures {
    conn: ConnectionManager,
    prefix: String,
    script: Script,
    free: u32,
    base_ms: u64,
    max_ms: u64,
    window_secs: u64,
}

impl LoginFailures {
    pub fn new(conn: ConnectionManager, prefix: &str, settings: &LoginSettings) -> Self {
        LoginFailures {
            conn,
            prefix: prefix.to_owned(),
            script: Script::new(GATE),
            free: settings.free_failures,
            base_ms: settings.delay_base_secs * 1000,
            max_ms: settings.delay_max_secs * 1000,
            window_secs: settings.failure_window_secs.max(1),
        }
    }

    fn key(&self, account: &str) -> String {
        let hash = digest(&SHA256, account.as_bytes());
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("{}login:failures:{hex}", self.prefix)
    }

    /// Counts one attempt on `account` (normalized). `Err(wait)` when it must wait.
    pub async fn attempt(&self, account: &str) -> anyhow::Result<Result<(), Duration>> {
        let mut conn = self.conn.clone();
        let wait_ms: u64 = self
            .script
            .key(self.key(account))
            .arg(self.free)
            .arg(self.base_ms)
            .arg(self.max_ms)
            .arg(self.window_secs)
            .invoke_async(&mut conn)
            .await?;
        Ok(match wait_ms {
            0 => Ok(()),
            ms => Err(Duration::from_millis(ms)),
        })
    }

    /// A successful login: the account starts afresh.
    pub async fn reset(&self, account: &str) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("DEL")
            .arg(self.key(account))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}
