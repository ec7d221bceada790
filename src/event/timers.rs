//! The one deadline queue: every timer of tau-init (restart delays, stop and readiness
//! timeouts, stable-uptime resets, shutdown, sampling) lives here, and the earliest deadline
//! sets the poll timeout. Setting a key again moves it; cancelling is O(log n).

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

/// A set of keyed deadlines in milliseconds of one monotonic clock.
#[derive(Debug, Clone)]
pub struct Timers<K: Ord + Hash + Copy> {
    by_time: BTreeSet<(u64, K)>,
    by_key: HashMap<K, u64>,
}

impl<K: Ord + Hash + Copy> Default for Timers<K> {
    fn default() -> Self {
        Self {
            by_time: BTreeSet::new(),
            by_key: HashMap::new(),
        }
    }
}

impl<K: Ord + Hash + Copy> Timers<K> {
    /// Set (or move) the deadline of `key`.
    pub fn set(&mut self, key: K, at: u64) {
        if let Some(old) = self.by_key.insert(key, at) {
            self.by_time.remove(&(old, key));
        }
        self.by_time.insert((at, key));
    }

    /// Remove `key`, if set.
    pub fn cancel(&mut self, key: K) {
        if let Some(old) = self.by_key.remove(&key) {
            self.by_time.remove(&(old, key));
        }
    }

    /// Deadline of `key`, if set.
    pub fn get(&self, key: K) -> Option<u64> {
        self.by_key.get(&key).copied()
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<u64> {
        self.by_time.first().map(|&(t, _)| t)
    }

    /// Milliseconds until the earliest deadline from `now` (None: nothing due, sleep until an
    /// event).
    pub fn timeout_ms(&self, now: u64) -> Option<u64> {
        self.next().map(|t| t.saturating_sub(now))
    }

    /// Remove and return one key whose deadline is at or before `now`, earliest first.
    pub fn pop_due(&mut self, now: u64) -> Option<K> {
        let &(t, k) = self.by_time.first()?;
        if t > now {
            return None;
        }
        self.by_time.remove(&(t, k));
        self.by_key.remove(&k);
        Some(k)
    }

    /// Remove and return every timer whose key matches `f`.
    pub fn take_if(&mut self, f: impl Fn(&K) -> bool) -> Vec<(K, u64)> {
        let keys: Vec<(K, u64)> = self
            .by_key
            .iter()
            .filter(|(k, _)| f(k))
            .map(|(k, t)| (*k, *t))
            .collect();
        for (k, _) in &keys {
            self.cancel(*k);
        }
        keys
    }

    /// Every pending timer, earliest first.
    pub fn entries(&self) -> Vec<(K, u64)> {
        self.by_time.iter().map(|&(t, k)| (k, t)).collect()
    }

    /// Number of pending timers.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// No pending timers.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_and_reset_moves() {
        let mut t = Timers::default();
        t.set('a', 300);
        t.set('b', 100);
        t.set('c', 200);
        t.set('a', 50); // moved earlier
        assert_eq!(t.len(), 3);
        assert_eq!(t.timeout_ms(40), Some(10));
        assert_eq!(t.pop_due(40), None);
        assert_eq!(t.pop_due(150), Some('a'));
        assert_eq!(t.pop_due(150), Some('b'));
        assert_eq!(t.pop_due(150), None);
        t.cancel('c');
        assert!(t.is_empty());
        assert_eq!(t.timeout_ms(0), None);
    }

    #[test]
    fn overdue_timer_gives_zero_timeout() {
        let mut t = Timers::default();
        t.set(1u8, 10);
        assert_eq!(t.timeout_ms(500), Some(0));
        assert_eq!(t.get(1), Some(10));
    }
}
