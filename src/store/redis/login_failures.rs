//! Per-account (and per-device) login failure budgets in Redis, shared by every instance.
//!
//! `governor` limits bursts inside one process; this is the budget that must hold
//! however many instances run. Each budget key (the normalized email as submitted,
//! whether or not the account exists, or a known device token; hashed so Redis holds
//! neither) counts *failed* attempts since its last success. The first `free` failures
//! are free; after that each attempt must wait `delay_base * 2^k` since the previous
//! failure (k = failures past the free ones), at most `delay_max`. The wait is bounded,
//! so an attacker can slow a new device's logins down but never lock the account; a
//! success resets the count. A device budget has no delay: past its free failures the
//! device simply stops counting as known (see `crate::auth::device`).
//!
//! Only failures count. An attempt *reserves* a place before the password is hashed
//! (a lease in a sorted set, so a crashed instance's places free themselves), and
//! reports its outcome afterwards: a wrong password becomes a failure, a right one
//! resets the count, anything else (the hash could not run) just gives the place back.
//! Places and failures together never exceed the free budget (and past it, one attempt
//! is in flight at a time), so N concurrent wrong passwords reach the hash at most
//! `free` times, while N concurrent *correct* ones all succeed: an attempt that finds
//! every free place taken by attempts still in flight is told to wait for them
//! ([`Gate::Busy`]), not refused. Attempts refused with 429 are never counted.
//!
//! The check and the reservation are one Lua script, atomic and by Redis's clock, so two
//! instances (or two concurrent requests) cannot share one place.

use std::time::Duration;

use super::measured::Measured;
use redis::Script;

use crate::config::LoginSettings;
use crate::store::{BUDGET_LEASE, Budget, BudgetRules, FailureBudgets, Gate, Outcome, Place};

/// Returns 0 after reserving a place for attempt ARGV[5], -1 when the free places are
/// all held by attempts in flight (wait for them), -2 when a budget without delay is
/// used up, or else the milliseconds to wait. KEYS[1]: the budget's hash {n: failures,
/// at: ms of the last failure}; KEYS[2]: the sorted set of places in flight (score: end
/// of the lease, ms). ARGV: free failures, base delay ms (0: no delay, -2 past free),
/// max delay ms, failure window secs, attempt id, lease ms.
const GATE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local p = redis.call('ZCARD', KEYS[2])
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local free = tonumber(ARGV[1])
local base = tonumber(ARGV[2])
if n >= free then
  if base == 0 then
    return -2
  end
  local at = tonumber(redis.call('HGET', KEYS[1], 'at') or '0')
  local delay = tonumber(ARGV[3])
  local k = n - free
  if k < 40 then
    delay = math.min(delay, base * 2 ^ k)
  end
  local wait = at + delay - now
  if wait > 0 then
    return wait
  end
  if p > 0 then
    return -1
  end
elseif n + p >= free then
  return -1
end
local lease = tonumber(ARGV[6])
redis.call('ZADD', KEYS[2], now + lease, ARGV[5])
redis.call('PEXPIRE', KEYS[2], lease)
return 0
";

/// Gives back attempt ARGV[1]'s place and records its outcome ARGV[2]: `failed` counts
/// a failure (kept ARGV[3] secs), `succeeded` resets the budget, anything else neither.
const FINISH: &str = r"
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == 'failed' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HINCRBY', KEYS[1], 'n', 1)
  redis.call('HSET', KEYS[1], 'at', now)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
elseif ARGV[2] == 'succeeded' then
  redis.call('DEL', KEYS[1])
end
return 0
";

#[derive(Clone)]
pub struct LoginFailures {
    conn: Measured,
    prefix: String,
    gate: Script,
    finish: Script,
    rules: BudgetRules,
}

impl LoginFailures {
    pub fn new(conn: Measured, prefix: &str, settings: &LoginSettings) -> Self {
        LoginFailures {
            conn,
            prefix: prefix.to_owned(),
            gate: Script::new(GATE),
            finish: Script::new(FINISH),
            rules: BudgetRules::from_settings(settings),
        }
    }

    fn keys(&self, budget: Budget, key: &str) -> [String; 2] {
        let kind = match budget {
            Budget::Account => "failures",
            Budget::Device => "device",
        };
        let hex: String = crate::domain::sha256(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let base = format!("{}login:{kind}:{hex}", self.prefix);
        [base.clone(), format!("{base}:inflight")]
    }
}

#[async_trait::async_trait]
impl FailureBudgets for LoginFailures {
    async fn reserve(&self, budget: Budget, key: &str) -> anyhow::Result<Gate> {
        if let Some(gate) = self.rules.switched_off(budget, key) {
            return Ok(gate);
        }
        let (free, base) = self.rules.limits(budget);
        let keys = self.keys(budget, key);
        let place = Place::new(budget, key, true);
        let mut conn = self.conn.clone();
        let answer: i64 = self
            .gate
            .key(&keys[0])
            .key(&keys[1])
            .arg(free)
            .arg(base.as_millis() as u64)
            .arg(self.rules.delay_max.as_millis() as u64)
            .arg(self.rules.window.as_secs())
            .arg(&place.id)
            .arg(BUDGET_LEASE.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(match answer {
            0 => Gate::Reserved(place),
            -1 => Gate::Busy,
            -2 => Gate::Exhausted,
            ms => Gate::Wait(Duration::from_millis(ms.max(1) as u64)),
        })
    }

    async fn finish(&self, place: &Place, outcome: Outcome) -> anyhow::Result<()> {
        if !place.counted {
            return Ok(());
        }
        let keys = self.keys(place.budget, &place.key);
        let outcome = match outcome {
            Outcome::Failed => "failed",
            Outcome::Succeeded => "succeeded",
            Outcome::Abandoned => "abandoned",
        };
        let mut conn = self.conn.clone();
        let _: i64 = self
            .finish
            .key(&keys[0])
            .key(&keys[1])
            .arg(&place.id)
            .arg(outcome)
            .arg(self.rules.window.as_secs())
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn reset(&self, budget: Budget, key: &str) -> anyhow::Result<()> {
        let keys = self.keys(budget, key);
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("DEL")
            .arg(&keys[0])
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}
