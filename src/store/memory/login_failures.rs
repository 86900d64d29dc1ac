//! Login failure budgets held in the process, with the rules of
//! [`crate::store::redis::login_failures`] (whose Lua scripts this follows step by step:
//! keep the two in agreement).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::LoginSettings;
use crate::store::{BUDGET_LEASE, Budget, BudgetRules, FailureBudgets, Gate, Outcome, Place};

#[derive(Default)]
struct Entry {
    /// Failures since the last success, while `until` has not passed.
    failures: u32,
    last_failure: Option<Instant>,
    until: Option<Instant>,
    /// Places in flight: attempt id → end of its lease.
    in_flight: HashMap<String, Instant>,
}

impl Entry {
    fn forget_expired(&mut self, now: Instant) {
        if self.until.is_some_and(|until| until <= now) {
            self.failures = 0;
            self.last_failure = None;
            self.until = None;
        }
        self.in_flight.retain(|_, end| *end > now);
    }

    fn is_idle(&self) -> bool {
        self.failures == 0 && self.in_flight.is_empty()
    }
}

/// Idle budgets are dropped at most this often (a sweep over all of them).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub struct MemoryBudgets {
    entries: Mutex<HashMap<(Budget, String), Entry>>,
    last_sweep: Mutex<Instant>,
    rules: BudgetRules,
}

impl MemoryBudgets {
    pub fn new(settings: &LoginSettings) -> Self {
        MemoryBudgets {
            entries: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(Instant::now()),
            rules: BudgetRules::from_settings(settings),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<(Budget, String), Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl FailureBudgets for MemoryBudgets {
    async fn reserve(&self, budget: Budget, key: &str) -> anyhow::Result<Gate> {
        if let Some(gate) = self.rules.switched_off(budget, key) {
            return Ok(gate);
        }
        let (free, base) = self.rules.limits(budget);
        let now = Instant::now();
        let mut entries = self.entries();
        // Idle budgets are swept out now and then: memory stays bounded by the budgets
        // in use within one failure window, and a reservation costs no sweep of its own.
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
            if now.duration_since(*last) >= SWEEP_EVERY {
                entries.retain(|_, e| {
                    e.forget_expired(now);
                    !e.is_idle()
                });
                *last = now;
            }
        }
        let entry = entries.entry((budget, key.to_owned())).or_default();
        entry.forget_expired(now);
        let in_flight = entry.in_flight.len() as u32;
        if entry.failures >= free {
            if base.is_zero() {
                return Ok(Gate::Exhausted);
            }
            let past = entry.failures - free;
            let delay = match past {
                0..40 => base
                    .saturating_mul(1 << past.min(31))
                    .min(self.rules.delay_max),
                _ => self.rules.delay_max,
            };
            let ready_at = entry.last_failure.map_or(now, |at| at + delay);
            if ready_at > now {
                return Ok(Gate::Wait((ready_at - now).max(Duration::from_millis(1))));
            }
            if in_flight > 0 {
                return Ok(Gate::Busy);
            }
        } else if entry.failures + in_flight >= free {
            return Ok(Gate::Busy);
        }
        let place = Place::new(budget, key, true);
        entry.in_flight.insert(place.id.clone(), now + BUDGET_LEASE);
        Ok(Gate::Reserved(place))
    }

    async fn finish(&self, place: &Place, outcome: Outcome) -> anyhow::Result<()> {
        if !place.counted {
            return Ok(());
        }
        let now = Instant::now();
        let mut entries = self.entries();
        let entry = entries
            .entry((place.budget, place.key.clone()))
            .or_default();
        entry.in_flight.remove(&place.id);
        match outcome {
            Outcome::Failed => {
                entry.forget_expired(now);
                entry.failures += 1;
                entry.last_failure = Some(now);
                entry.until = Some(now + self.rules.window);
            }
            Outcome::Succeeded => {
                entry.failures = 0;
                entry.last_failure = None;
                entry.until = None;
            }
            Outcome::Abandoned => {}
        }
        Ok(())
    }

    async fn reset(&self, budget: Budget, key: &str) -> anyhow::Result<()> {
        if let Some(entry) = self.entries().get_mut(&(budget, key.to_owned())) {
            entry.failures = 0;
            entry.last_failure = None;
            entry.until = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(free: u32, device_free: u32, base_secs: u64) -> MemoryBudgets {
        let mut settings = crate::config::Settings::load_from(None, Vec::new())
            .expect("defaults load")
            .login;
        settings.free_failures = free;
        settings.device_free_failures = device_free;
        settings.delay_base_secs = base_secs;
        settings.delay_max_secs = 60;
        MemoryBudgets::new(&settings)
    }

    async fn place(b: &MemoryBudgets, budget: Budget, key: &str) -> Place {
        match b.reserve(budget, key).await.unwrap() {
            Gate::Reserved(place) => place,
            other => panic!("expected a place, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn only_failures_count_and_places_in_flight_make_others_wait() {
        let b = budgets(2, 3, 1);
        // Two places may be in flight; a third attempt waits for them (Busy).
        let first = place(&b, Budget::Account, "a").await;
        let second = place(&b, Budget::Account, "a").await;
        assert!(matches!(
            b.reserve(Budget::Account, "a").await.unwrap(),
            Gate::Busy
        ));
        // Another account is unaffected.
        place(&b, Budget::Account, "b").await;
        // Successes free their places and count nothing.
        b.finish(&first, Outcome::Succeeded).await.unwrap();
        b.finish(&second, Outcome::Abandoned).await.unwrap();
        for _ in 0..5 {
            let p = place(&b, Budget::Account, "a").await;
            b.finish(&p, Outcome::Succeeded).await.unwrap();
        }
        // Two failures use up the free ones; the next attempt must wait the delay.
        for _ in 0..2 {
            let p = place(&b, Budget::Account, "a").await;
            b.finish(&p, Outcome::Failed).await.unwrap();
        }
        match b.reserve(Budget::Account, "a").await.unwrap() {
            Gate::Wait(wait) => assert!(wait <= Duration::from_secs(1) && !wait.is_zero()),
            other => panic!("expected a wait, got {other:?}"),
        }
        // A reset (a success elsewhere) forgets them.
        b.reset(Budget::Account, "a").await.unwrap();
        place(&b, Budget::Account, "a").await;
    }

    #[tokio::test]
    async fn a_device_budget_has_no_delay_and_is_exhausted_past_its_free_failures() {
        let b = budgets(5, 1, 1);
        let p = place(&b, Budget::Device, "d").await;
        b.finish(&p, Outcome::Failed).await.unwrap();
        assert!(matches!(
            b.reserve(Budget::Device, "d").await.unwrap(),
            Gate::Exhausted
        ));
        // A budget switched off never counts.
        let off = budgets(0, 0, 0);
        let p = place(&off, Budget::Account, "x").await;
        assert!(!p.counted);
        assert!(matches!(
            off.reserve(Budget::Device, "x").await.unwrap(),
            Gate::Exhausted
        ));
    }

    #[tokio::test]
    async fn an_account_budget_without_delay_is_exhausted_past_its_free_failures() {
        let b = budgets(1, 1, 0);
        // No delay configured: past its free failures the account budget refuses, as a
        // device's does (the Redis script's `base == 0`).
        let p = place(&b, Budget::Account, "a").await;
        b.finish(&p, Outcome::Failed).await.unwrap();
        assert!(matches!(
            b.reserve(Budget::Account, "a").await.unwrap(),
            Gate::Exhausted
        ));
    }

    #[tokio::test]
    async fn past_the_free_failures_one_attempt_at_a_time_with_growing_delays() {
        let b = budgets(1, 1, 1);
        let p = place(&b, Budget::Account, "a").await;
        b.finish(&p, Outcome::Failed).await.unwrap();
        assert!(matches!(
            b.reserve(Budget::Account, "a").await.unwrap(),
            Gate::Wait(_)
        ));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // The delay has passed: one attempt may go, the next waits for it.
        let p = place(&b, Budget::Account, "a").await;
        assert!(matches!(
            b.reserve(Budget::Account, "a").await.unwrap(),
            Gate::Busy
        ));
        b.finish(&p, Outcome::Failed).await.unwrap();
        // Two past the free one: the delay doubled.
        match b.reserve(Budget::Account, "a").await.unwrap() {
            Gate::Wait(wait) => assert!(wait > Duration::from_millis(1500), "{wait:?}"),
            other => panic!("expected a wait, got {other:?}"),
        }
    }
}
