//! Admission of one password check (login, password change): every limit that must
//! pass before a password is hashed, and the outcome reported afterwards.
//!
//! In order: the per-process burst limit per IP; for a caller without a known device,
//! the per-process burst limit per account; a place in the hashing pool (503 at once
//! when it is full, before any round trip, so a flood costs the other endpoints as
//! little as possible); then a place in the failure budget shared through Redis: the
//! device's own budget for a known device (see [`super::device`]), else the account's
//! (see [`crate::store::redis::login_failures`]). When the budget's free places are all held
//! by attempts still in flight, the attempt waits for them (a correct password is never
//! refused because other correct ones are in flight) for at most [`BUSY_WAIT`].
//!
//! The returned [`Attempt`] must be finished with the check's outcome; one dropped
//! unfinished (the request was cancelled, the hash could not run) gives its place back
//! without counting anything.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::device::DeviceToken;
use super::password::HashSlot;
use super::session::AuthService;
use super::throttle;
use crate::domain::Email;
use crate::error::ApiError;
use crate::store::{AuditKind, ClientInfo, Credentials};
use crate::store::{Budget, FailureBudgets, Gate, Outcome, Place};

/// The longest an attempt waits for attempts in flight on the same budget before it is
/// told to come back (429, `Retry-After: 1`). Far above one hash plus its queue wait.
pub const BUSY_WAIT: Duration = Duration::from_secs(5);

/// An admitted password check.
pub struct Attempt {
    /// The place in the hashing pool; taken by the check.
    pub slot: Option<HashSlot>,
    /// The user the email names, if any (with `device_known` for the presented device).
    pub credentials: Option<Credentials>,
    /// The presented device token, when it is valid for this account.
    pub known_device: Option<DeviceToken>,
    place: Option<(Place, Budget)>,
    failures: Arc<dyn FailureBudgets>,
}

impl Attempt {
    /// Takes the hashing place (once).
    pub fn take_slot(&mut self) -> HashSlot {
        self.slot.take().expect("the hashing place is taken once")
    }

    /// Reports how the check ended and gives the budget place back. A success resets
    /// the budget it was counted in, and a known device's own budget in any case (a
    /// device that ran out is known again after its next success). Best effort: if
    /// Redis fails here the lease simply runs out.
    pub async fn finish(mut self, outcome: Outcome) {
        let Some((place, budget)) = self.place.take() else {
            return;
        };
        if let Err(e) = self.failures.finish(&place, outcome).await {
            tracing::warn!(error = %e, "could not record the login attempt's outcome");
        }
        if outcome == Outcome::Succeeded
            && budget == Budget::Account
            && let Some(device) = &self.known_device
            && let Err(e) = self
                .failures
                .reset(Budget::Device, &device.budget_key())
                .await
        {
            tracing::warn!(error = %e, "could not reset a device's failure count");
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some((place, _)) = self.place.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let failures = self.failures.clone();
            runtime.spawn(async move {
                if let Err(e) = failures.finish(&place, Outcome::Abandoned).await {
                    tracing::debug!(error = %e, "could not give back a login attempt's place");
                }
            });
        }
    }
}

/// Why an attempt was not admitted.
enum Refusal {
    Throttled { retry_after: u64, by: &'static str },
    Error(ApiError),
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal::Error(e)
    }
}

impl AuthService {
    /// Admits one password check for `email`, presenting `device` if the client has one.
    pub(super) async fn admit_password_attempt(
        &self,
        email: &Email,
        device: Option<DeviceToken>,
        ip: IpAddr,
        client: &ClientInfo,
    ) -> Result<Attempt, ApiError> {
        let account = email.normalized();
        match self.admit(email, &account, device, ip).await {
            Ok(attempt) => Ok(attempt),
            Err(Refusal::Error(e)) => Err(e),
            Err(Refusal::Throttled { retry_after, by }) => {
                self.audit_throttled(email, &account, ip, by, retry_after, client)
                    .await;
                Err(ApiError::RateLimited(retry_after.max(1)))
            }
        }
    }

    async fn admit(
        &self,
        email: &Email,
        account: &str,
        device: Option<DeviceToken>,
        ip: IpAddr,
    ) -> Result<Attempt, Refusal> {
        let throttled = |t: throttle::Throttled, by| Refusal::Throttled {
            retry_after: t.retry_after_secs,
            by,
        };
        self.throttle.check_ip(ip).map_err(|t| throttled(t, "ip"))?;
        if device.is_none() {
            self.throttle
                .check_account(account)
                .map_err(|t| throttled(t, "account"))?;
        }
        let slot = self.hasher.reserve().map_err(ApiError::from)?;
        let mut attempt = Attempt {
            slot: Some(slot),
            credentials: None,
            known_device: None,
            place: None,
            failures: self.failures.clone(),
        };

        let looked_up = device.is_some();
        if let Some(device) = device {
            // Whether the device is known for this account needs the user row anyway.
            let credentials = self
                .store
                .find_credentials(email, Some(&device.hash()))
                .await
                .map_err(ApiError::from)?;
            let known = credentials.as_ref().is_some_and(|c| c.device_known);
            attempt.credentials = credentials;
            if known {
                let key = device.budget_key();
                attempt.known_device = Some(device);
                // Used up, the device is a stranger until its next success.
                if let Some(place) = self.reserve_waiting(Budget::Device, &key).await? {
                    attempt.place = Some((place, Budget::Device));
                    return Ok(attempt);
                }
            }
            self.throttle
                .check_account(account)
                .map_err(|t| throttled(t, "account"))?;
        }

        let place = self
            .reserve_waiting(Budget::Account, account)
            .await?
            .expect("the account budget has a delay, it is never used up");
        attempt.place = Some((place, Budget::Account));
        if !looked_up {
            attempt.credentials = self
                .store
                .find_credentials(email, None)
                .await
                .map_err(ApiError::from)?;
        }
        Ok(attempt)
    }

    /// A place in `budget`, waiting out attempts in flight for up to [`BUSY_WAIT`].
    /// `None` when a device budget is used up.
    async fn reserve_waiting(&self, budget: Budget, key: &str) -> Result<Option<Place>, Refusal> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            let gate = self
                .failures
                .reserve(budget, key)
                .await
                .map_err(ApiError::unavailable)?;
            match gate {
                Gate::Reserved(place) => return Ok(Some(place)),
                Gate::Exhausted => return Ok(None),
                Gate::Wait(wait) => {
                    return Err(Refusal::Throttled {
                        retry_after: throttle::secs(wait),
                        by: "failures",
                    });
                }
                Gate::Busy if started.elapsed() >= BUSY_WAIT => {
                    return Err(Refusal::Throttled {
                        retry_after: 1,
                        by: "in_flight",
                    });
                }
                Gate::Busy => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
            }
        }
    }

    /// A throttled attempt is audited at most once a minute per IP or account and
    /// process, naming the account when it exists.
    async fn audit_throttled(
        &self,
        email: &Email,
        account: &str,
        ip: IpAddr,
        by: &str,
        retry_after: u64,
        client: &ClientInfo,
    ) {
        tracing::warn!(by, "login attempt throttled");
        let by_ip = by == "ip";
        let audit_key = if by_ip {
            format!("ip:{}", self.throttle.ip_key(ip))
        } else {
            format!("account:{account}")
        };
        if !self.throttle.should_audit(&audit_key) {
            return;
        }
        let user_id = match by_ip {
            true => None,
            false => self
                .store
                .find_credentials(email, None)
                .await
                .ok()
                .flatten()
                .map(|c| c.user.id),
        };
        self.audit(
            AuditKind::LoginThrottled,
            user_id,
            None,
            client,
            json!({"by": by, "retry_after_secs": retry_after}),
        )
        .await;
    }
}
