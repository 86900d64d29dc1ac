//! A small bounded map of recently used entries, for results that are expensive to
//! recompute and can never go stale (see where it is used: users' emails for `GET /me`,
//! access tokens whose signature has been checked).
//!
//! Two generations of at most `capacity / 2` entries each: entries go into the young
//! one; when it is full it becomes the old one (the previous old one is dropped), and a
//! hit in the old one moves the entry back to the young one. Recently used entries
//! stay, the memory never exceeds `capacity` entries, and there is no per-entry
//! bookkeeping. A capacity below 2 turns it off.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{PoisonError, RwLock};

pub struct Recent<K, V> {
    generation: usize,
    maps: RwLock<Generations<K, V>>,
}

struct Generations<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
}

impl<K: Hash + Eq, V: Clone> Recent<K, V> {
    pub fn new(capacity: usize) -> Self {
        Recent {
            generation: capacity / 2,
            maps: RwLock::new(Generations {
                young: HashMap::new(),
                old: HashMap::new(),
            }),
        }
    }

    pub fn get(&self, key: &K) -> Option<V>
    where
        K: Clone,
    {
        if self.generation == 0 {
            return None;
        }
        let (value, young) = {
            let maps = self.maps.read().unwrap_or_else(PoisonError::into_inner);
            match maps.young.get(key) {
                Some(value) => (value.clone(), true),
                None => (maps.old.get(key)?.clone(), false),
            }
        };
        if !young {
            self.insert(key.clone(), value.clone());
        }
        Some(value)
    }

    pub fn insert(&self, key: K, value: V) {
        if self.generation == 0 {
            return;
        }
        let mut maps = self.maps.write().unwrap_or_else(PoisonError::into_inner);
        if maps.young.len() >= self.generation && !maps.young.contains_key(&key) {
            maps.old = std::mem::take(&mut maps.young);
        }
        maps.young.insert(key, value);
    }

    /// Drops one entry (from both generations).
    pub fn remove(&self, key: &K) {
        let mut maps = self.maps.write().unwrap_or_else(PoisonError::into_inner);
        maps.young.remove(key);
        maps.old.remove(key);
    }

    /// Entries held now (an entry being moved between generations may count twice).
    #[cfg(test)]
    fn len(&self) -> usize {
        let maps = self.maps.read().unwrap_or_else(PoisonError::into_inner);
        maps.young.len() + maps.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(n: u32) -> String {
        format!("user{n}@example.com")
    }

    #[test]
    fn returns_what_was_inserted_and_nothing_else() {
        let cache = Recent::new(10);
        assert!(cache.get(&1).is_none());
        cache.insert(1, value(1));
        cache.insert(2, value(2));
        assert_eq!(cache.get(&1), Some(value(1)));
        assert_eq!(cache.get(&2), Some(value(2)));
        assert!(cache.get(&3).is_none());
        cache.remove(&1);
        assert!(cache.get(&1).is_none());
        assert_eq!(cache.get(&2), Some(value(2)));
    }

    #[test]
    fn never_holds_more_than_its_capacity() {
        let cache = Recent::new(100);
        for n in 0..10_000 {
            cache.insert(n, value(n));
            assert!(cache.len() <= 100, "{} entries after {n}", cache.len());
        }
        assert_eq!(cache.get(&9_999), Some(value(9_999)));
        assert!(cache.get(&0).is_none(), "the oldest entries are gone");
    }

    #[test]
    fn an_entry_in_use_survives_while_others_come_and_go() {
        let cache = Recent::new(100);
        cache.insert(0, value(0));
        for n in 1..10_000 {
            cache.insert(n, value(n));
            assert_eq!(cache.get(&0), Some(value(0)), "lost after {n} inserts");
        }
    }

    #[test]
    fn a_removed_entry_is_gone_from_the_old_generation_too() {
        let cache = Recent::new(4);
        cache.insert(0, value(0));
        cache.insert(1, value(1));
        cache.insert(2, value(2)); // 0 and 1 are now the old generation
        cache.remove(&0);
        assert!(cache.get(&0).is_none());
        assert_eq!(cache.get(&1), Some(value(1)));
    }

    #[test]
    fn capacity_below_two_keeps_nothing() {
        for capacity in [0, 1] {
            let cache = Recent::new(capacity);
            cache.insert(1, value(1));
            assert!(cache.get(&1).is_none());
            assert_eq!(cache.len(), 0);
        }
    }
}
