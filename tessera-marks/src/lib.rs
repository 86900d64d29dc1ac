//! Tessera's revocation marks, and an in-memory copy of them that follows Redis.
//!
//! The server writes each revocation as a Redis key that expires on its own, and
//! publishes the same key, value and lifetime on `{prefix}revocations` as
//! `"<key without prefix> <value> <ttl secs>"`, in the same round trip as the write:
//! - `revoked:sid:<session>`: every access token of that session;
//! - `revoked:jti:<jti>`: one access token;
//! - `revoked:user:<user>` = Unix ms: every token of the user issued at or before then.
//!
//! [`Marks`] is the set those keys describe; [`Feed`] keeps one current from Redis (see
//! its docs), for the server's own checks and for `tessera-verify` in downstream APIs.

mod feed;
mod source;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

pub use feed::{AckRequest, Feed, FeedConfig, NO_ACKS, client, instances_channel};
pub use source::Source;

/// What a check asks about: one access token.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub session: Uuid,
    pub jti: &'a str,
    pub user: Uuid,
    /// The token's issue time in Unix milliseconds.
    pub issued_ms: i64,
}

/// The live revocation marks, each with the instant it stops counting.
#[derive(Debug, Default)]
pub struct Marks {
    sessions: HashMap<Uuid, Instant>,
    tokens: HashMap<String, Instant>,
    /// Tokens of the user issued at or before the ms value are revoked.
    users: HashMap<Uuid, (i64, Instant)>,
}

impl Marks {
    /// Applies one `revoked:*` key (without the prefix) with its value and remaining
    /// lifetime. Anything else is ignored: a newer server may publish kinds this copy
    /// does not know, and a check must not fail because of them.
    pub fn apply(&mut self, key: &str, value: &str, ttl: Duration) {
        let until = Instant::now() + ttl;
        if let Some(sid) = key.strip_prefix("revoked:sid:") {
            if let Ok(sid) = Uuid::parse_str(sid) {
                let entry = self.sessions.entry(sid).or_insert(until);
                *entry = (*entry).max(until);
            }
        } else if let Some(jti) = key.strip_prefix("revoked:jti:") {
            let entry = self.tokens.entry(jti.to_owned()).or_insert(until);
            *entry = (*entry).max(until);
        } else if let Some(user) = key.strip_prefix("revoked:user:")
            && let (Ok(user), Ok(at)) = (Uuid::parse_str(user), value.parse::<i64>())
        {
            // The later cut-off covers the earlier one; keep it, and the longer life.
            let entry = self.users.entry(user).or_insert((at, until));
            *entry = (entry.0.max(at), entry.1.max(until));
        }
    }

    /// Applies one published message, `"<key> <value> <ttl secs>"`; false if malformed.
    pub fn apply_message(&mut self, payload: &str) -> bool {
        let mut parts = payload.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(key), Some(value), Some(ttl), None) => match ttl.parse::<u64>() {
                Ok(ttl) => {
                    self.apply(key, value, Duration::from_secs(ttl));
                    true
                }
                Err(_) => false,
            },
            _ => false,
        }
    }

    pub fn revokes(&self, subject: &Subject<'_>, now: Instant) -> bool {
        let live = |until: &Instant| *until > now;
        self.revokes_session(subject.session, now)
            || self.tokens.get(subject.jti).is_some_and(live)
            || self
                .users
                .get(&subject.user)
                .is_some_and(|(at, until)| live(until) && subject.issued_ms <= *at)
    }

    /// Whether the session itself has a live mark.
    pub fn revokes_session(&self, session: Uuid, now: Instant) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|until| *until > now)
    }

    /// Drops the marks that no longer count.
    pub fn prune(&mut self, now: Instant) {
        self.sessions.retain(|_, until| *until > now);
        self.tokens.retain(|_, until| *until > now);
        self.users.retain(|_, (_, until)| *until > now);
    }

    /// Adds every mark of `other` (the union: a mark in either counts).
    pub fn merge(&mut self, other: Marks) {
        for (k, until) in other.sessions {
            let entry = self.sessions.entry(k).or_insert(until);
            *entry = (*entry).max(until);
        }
        for (k, until) in other.tokens {
            let entry = self.tokens.entry(k).or_insert(until);
            *entry = (*entry).max(until);
        }
        for (k, (at, until)) in other.users {
            let entry = self.users.entry(k).or_insert((at, until));
            *entry = (entry.0.max(at), entry.1.max(until));
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len() + self.tokens.len() + self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(user: Uuid, session: Uuid, jti: &str, issued_ms: i64) -> Subject<'_> {
        Subject {
            session,
            jti,
            user,
            issued_ms,
        }
    }

    #[test]
    fn the_set_applies_the_servers_three_kinds_of_marks() {
        let (user, sid) = (Uuid::new_v4(), Uuid::new_v4());
        let mut set = Marks::default();
        let now = Instant::now();
        let c = subject(user, sid, "t1", 1000);
        assert!(!set.revokes(&c, now));
        set.apply(&format!("revoked:sid:{sid}"), "1", Duration::from_secs(60));
        assert!(set.revokes(&c, now));
        let other = subject(user, Uuid::new_v4(), "t2", 1000);
        assert!(set.apply_message("revoked:jti:t2 1 60"));
        assert!(set.revokes(&other, now));
        // Issued at 1000 ms: revoked by a mark at 1000, not 999.
        let third_user = Uuid::new_v4();
        let third = subject(third_user, Uuid::new_v4(), "t3", 1000);
        set.apply(
            &format!("revoked:user:{third_user}"),
            "999",
            Duration::from_secs(60),
        );
        assert!(!set.revokes(&third, now));
        set.apply(
            &format!("revoked:user:{third_user}"),
            "1000",
            Duration::from_secs(60),
        );
        assert!(set.revokes(&third, now));
        // An earlier cut-off arriving late does not undo the later one.
        set.apply(
            &format!("revoked:user:{third_user}"),
            "10",
            Duration::from_secs(60),
        );
        assert!(set.revokes(&third, now));
        // Marks expire.
        assert!(!set.revokes(&c, now + Duration::from_secs(61)));
        set.prune(now + Duration::from_secs(61));
        assert!(set.is_empty());
    }

    #[test]
    fn malformed_messages_and_unknown_kinds_change_nothing() {
        let mut set = Marks::default();
        assert!(!set.apply_message("revoked:jti:x 1"));
        assert!(!set.apply_message("revoked:jti:x 1 soon"));
        assert!(!set.apply_message("revoked:jti:x 1 60 extra"));
        assert!(set.apply_message("revoked:sid:not-a-uuid 1 60"));
        assert!(set.apply_message("revoked:device:abc 1 60"));
        assert!(set.is_empty());
    }

    #[test]
    fn a_merge_keeps_the_union_and_the_later_cut_off() {
        let (user, sid) = (Uuid::new_v4(), Uuid::new_v4());
        let now = Instant::now();
        let mut a = Marks::default();
        a.apply(
            &format!("revoked:user:{user}"),
            "2000",
            Duration::from_secs(60),
        );
        let mut b = Marks::default();
        b.apply(
            &format!("revoked:user:{user}"),
            "1000",
            Duration::from_secs(60),
        );
        b.apply(&format!("revoked:sid:{sid}"), "1", Duration::from_secs(60));
        a.merge(b);
        assert!(a.revokes(&subject(user, Uuid::new_v4(), "x", 1500), now));
        assert!(a.revokes(&subject(Uuid::new_v4(), sid, "y", 0), now));
        assert_eq!(a.len(), 2);
    }
}
