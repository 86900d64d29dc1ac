//! The durable outbox: what Tessera has to tell the outside world (emails, and webhooks:
//! see [`webhook`]) is written as a row in the transaction of the change it
//! reports, then delivered by a background [`sender`], at least once.
//!
//! A row's payload is an [`Item`] sealed with AES-256-GCM under a key derived from
//! `keys.dir/outbox.secret` (made on first start, shared like the signing keys by every
//! instance using that directory): the payload holds a link's token and an address,
//! which a database dump alone must not yield.

pub mod sender;
pub mod webhook;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::domain::UserId;
use crate::seal::Sealer;

/// One thing to deliver.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Item {
    Email {
        /// The user it is about (for the audit row if it cannot be delivered).
        user: Option<UserId>,
        /// A [`crate::email::templates::Template`] name.
        template: String,
        to: String,
        values: BTreeMap<String, String>,
    },
    /// One event for one receiver (see [`webhook`]).
    Webhook {
        url: String,
        /// `webhook-id`: the same on every attempt.
        id: String,
        /// The event type, for logs and the give-up audit row.
        event: String,
        /// The JSON body, fixed when the event happened.
        body: String,
    },
}

impl Item {
    /// The outbox row's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Item::Email { .. } => "email",
            Item::Webhook { .. } => "webhook",
        }
    }
}

impl std::fmt::Debug for Item {
    // Values hold tokens and addresses.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Email { template, .. } => write!(f, "Item::Email({template})"),
            Item::Webhook { event, .. } => write!(f, "Item::Webhook({event})"),
        }
    }
}

/// What the application's parts share about the outbox: how to seal a row, and how to
/// wake this instance's sender when one was written.
pub struct Outbox {
    sealer: Sealer,
    wake: Arc<Notify>,
}

impl Outbox {
    /// `secret`: the 32 random bytes of `keys.dir/outbox.secret`.
    pub fn new(secret: &[u8]) -> Self {
        Outbox {
            sealer: Sealer::new("tessera/outbox/v1", secret),
            wake: Arc::new(Notify::new()),
        }
    }

    /// The payload of a row holding `item`.
    pub fn seal(&self, item: &Item) -> Vec<u8> {
        let json = serde_json::to_vec(item).expect("an item serializes");
        self.sealer.seal(&json, b"")
    }

    /// The item a payload holds; `None` if it was not sealed under this key (another
    /// `outbox.secret`) or was altered.
    pub fn open(&self, sealed: &[u8]) -> Option<Item> {
        serde_json::from_slice(&self.sealer.open(sealed, b"")?).ok()
    }

    /// Tells this instance's sender that a row was written (others find it by polling).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) fn wakeup(&self) -> Arc<Notify> {
        self.wake.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> Item {
        Item::Email {
            user: None,
            template: "verify_email".into(),
            to: "ann@example.com".into(),
            values: [("link".to_owned(), "https://x/?token=SECRET".to_owned())].into(),
        }
    }

    #[test]
    fn a_sealed_item_opens_only_under_its_key_and_hides_its_contents() {
        let outbox = Outbox::new(&[7; 32]);
        let sealed = outbox.seal(&item());
        assert_eq!(outbox.open(&sealed), Some(item()));
        let text = String::from_utf8_lossy(&sealed);
        assert!(!text.contains("SECRET") && !text.contains("ann@"));
        assert_eq!(Outbox::new(&[8; 32]).open(&sealed), None);
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(outbox.open(&altered), None);
        assert_eq!(outbox.open(&sealed[..5]), None);
        assert_eq!(format!("{:?}", item()), "Item::Email(verify_email)");
    }
}
