//! Ids of events acknowledged but not yet in the redb file's id index: the
//! writer's half of idempotency by id (G3) until the applier catches up.
//!
//! Invariants:
//! - `order` holds the `(seq, id)` of every event recorded and not yet
//!   pruned, in `seq` order (the writer inserts in the order it assigns
//!   `seq`s).
//! - While `map` is `None`, `order` is also in `id` order: ids from this
//!   process's generator only grow, so the usual case finds an id by a
//!   binary search and hashes nothing (three hash-table operations per
//!   event were 3% of the publishing thread at 64 publishers,
//!   BENCHMARKS.md). The first id that is not above the last builds `map`,
//!   which then holds exactly `order`'s entries until `order` empties.
//! - Entries leave from the front of `order` once their `seq` is applied,
//!   so pruning costs only what it removes (a full scan per group cost
//!   about 20 µs at 64 publishers).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// The ids of acknowledged, unapplied events (or of one group being
/// committed), and their `seq`s.
#[derive(Default)]
pub(crate) struct RecentIds {
    order: VecDeque<(u64, u128)>,
    /// By id, once an id came out of order (see the module).
    map: Option<HashMap<u128, u64, BuildHasherDefault<IdHasher>>>,
}

impl RecentIds {
    /// Room for `n` events without growing.
    pub(crate) fn with_capacity(n: usize) -> RecentIds {
        RecentIds {
            order: VecDeque::with_capacity(n),
            map: None,
        }
    }

    /// The `seq` of the event with this id (as `id_key`), if it is here.
    pub(crate) fn get(&self, id: u128) -> Option<u64> {
        match &self.map {
            Some(map) => map.get(&id).copied(),
            None => self
                .order
                .binary_search_by_key(&id, |&(_, i)| i)
                .ok()
                .map(|at| self.order[at].0),
        }
    }

    /// Records an event; `seq`s must grow from call to call, and an id is
    /// recorded once.
    pub(crate) fn insert(&mut self, id: u128, seq: u64) {
        debug_assert!(self.order.back().is_none_or(|b| b.0 < seq));
        if self.map.is_none() && self.order.back().is_some_and(|&(_, last)| last >= id) {
            self.map = Some(self.order.iter().map(|&(s, i)| (i, s)).collect());
        }
        if let Some(map) = &mut self.map {
            map.insert(id, seq);
        }
        self.order.push_back((seq, id));
    }

    /// Forgets every event at or below `applied` (the redb index has them).
    pub(crate) fn prune(&mut self, applied: u64) {
        while let Some(&(seq, id)) = self.order.front() {
            if seq > applied {
                break;
            }
            self.order.pop_front();
            if let Some(map) = &mut self.map {
                map.remove(&id);
            }
        }
        if self.order.is_empty() {
            self.map = None;
        }
    }

    /// The ids recorded and not pruned, in `seq` order.
    pub(crate) fn into_ids(self) -> Vec<u128> {
        self.order.into_iter().map(|(_, id)| id).collect()
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        self.map = None;
        self.order.clear();
    }
}

/// A fast hasher for event ids (an FxHash-style multiply), in place of
/// `SipHash`: the ids are not attacker-chosen keys of an exposed table (a
/// client choosing colliding ids only slows its own duplicate checks), and
/// the writer hashes every event twice per group. ULIDs end in 80 random
/// bits that the monotonic generator increments within a millisecond, so
/// both halves are mixed in rather than used as they are.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl IdHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.add(v as u64);
        self.add((v >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        // A multiply mixes upwards only; the table indexes by the low bits
        // (as rustc-hash's `finish` does).
        self.0.rotate_left(26)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_removes_exactly_the_applied_prefix() {
        let mut ids = RecentIds::default();
        for seq in 1..=10u64 {
            ids.insert(u128::from(seq) << 64 | 7, seq);
        }
        ids.prune(4);
        for seq in 1..=10u64 {
            let got = ids.get(u128::from(seq) << 64 | 7);
            assert_eq!(got, (seq > 4).then_some(seq), "seq {seq}");
        }
        ids.prune(100);
        assert!(ids.get(10u128 << 64 | 7).is_none());
        assert!(ids.order.is_empty() && ids.map.is_none());
    }

    #[test]
    fn ids_out_of_order_are_found_before_and_after_the_map_is_built() {
        let mut ids = RecentIds::with_capacity(4);
        let id = |n: u128| n << 64 | 0xabc;
        for (seq, n) in [(1, 10), (2, 20), (3, 30)] {
            ids.insert(id(n), seq);
        }
        assert!(ids.map.is_none(), "ascending ids need no map");
        assert_eq!(ids.get(id(20)), Some(2));
        assert_eq!(ids.get(id(25)), None);
        // An id below the last: from here on by the map.
        ids.insert(id(15), 4);
        ids.insert(id(40), 5);
        assert!(ids.map.is_some());
        for (n, seq) in [(10, 1), (20, 2), (30, 3), (15, 4), (40, 5)] {
            assert_eq!(ids.get(id(n)), Some(seq), "id {n}");
        }
        assert_eq!(ids.get(id(35)), None);
        ids.prune(3);
        assert_eq!(ids.get(id(20)), None);
        assert_eq!(ids.get(id(15)), Some(4));
        // Emptied: back to the search, and in order again.
        ids.prune(5);
        assert!(ids.map.is_none());
        ids.insert(id(5), 6);
        assert_eq!(ids.get(id(5)), Some(6));
        assert!(ids.map.is_none(), "an empty log has no order to break");
    }

    #[test]
    fn a_search_and_a_map_agree_on_generated_ids() {
        let mut next = crate::test_rng::xorshift(0x2545_f491_4f6c_dd1d);
        for round in 0..50 {
            let mut ids = RecentIds::default();
            let mut all = std::collections::HashMap::new();
            let mut key = 1u128 << 100;
            for seq in 1..=200u64 {
                // Mostly ascending; in some rounds an id below the last.
                key = if round % 2 == 1 && next().is_multiple_of(50) {
                    u128::from(next())
                } else {
                    key + u128::from(next() % 3 + 1)
                };
                if all.contains_key(&key) {
                    continue;
                }
                ids.insert(key, seq);
                all.insert(key, seq);
            }
            for (&k, &s) in &all {
                assert_eq!(ids.get(k), Some(s));
                assert_eq!(ids.get(k + (1 << 90)), all.get(&(k + (1 << 90))).copied());
            }
        }
    }

    #[test]
    fn consecutive_ids_spread_over_buckets() {
        // Ids of one millisecond differ only in their last bits.
        let base: u128 = 0x0190_0000_0000_1234_5678_9abc_def0_0000;
        let mut low = std::collections::HashSet::new();
        for i in 0..1024u128 {
            let mut h = IdHasher::default();
            h.write_u128(base + i);
            low.insert(h.finish() & 1023);
        }
        // Far from all in a few buckets (a random spread fills ~63%).
        assert!(low.len() > 500, "{} distinct buckets of 1024", low.len());
    }
}
