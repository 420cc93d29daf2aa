//! How long a committer waits for the rest of its group before making it
//! durable: group commit's "commit siblings".
//!
//! Publishers on threads of their own settle into two half-groups when
//! the committer starts at once: while group N is fsync'd, the others queue
//! group N+1; when N is durable its publishers are woken and publish again,
//! but N+1's committer has already started, so they make group N+2. Every
//! fsync then carries half the publishers (16 threads: 8.0 events per
//! fdatasync, BENCHMARKS.md, "Eighth session"). Waiting for the ones just
//! answered joins the halves: one fsync per round of every publisher.
//!
//! Invariants:
//! - A committer waits only when the queue holds fewer requests than
//!   `expect`, and never longer than `patience`: at most one more durable
//!   step's time (the recent mean, capped at `MAX_PATIENCE`), which is
//!   where waiting stops paying (a round of P in one step plus the wait,
//!   against P/2 per step).
//! - `expect` comes only from what the last group saw: its own requests
//!   (answered, so they may come back) and those queued while it was made
//!   durable. A publisher that stops costs one wait, after which `expect`
//!   no longer counts it.
//! - Nothing waits without an fsync to share (`sync(false)`), nor for one
//!   publisher (`expect` 1), nor when the queue already holds a whole
//!   group of events (the committer's check, `Core::gather_rest`).

use std::time::Duration;

/// The longest a committer waits for the rest of its group.
pub(super) const MAX_PATIENCE: Duration = Duration::from_millis(1);

/// What the last group tells the next committer.
#[derive(Debug, Default)]
pub(super) struct Gather {
    /// Requests the next group may expect.
    expect: usize,
    /// Exponential mean of how long making a group durable took.
    durable: Duration,
}

impl Gather {
    /// A group of `reqs` requests took `took` to make durable, and
    /// `arrived` requests were queued when it was.
    pub(super) fn committed(&mut self, reqs: usize, arrived: usize, took: Duration) {
        self.expect = reqs + arrived;
        // Mean over about 8 groups: one slow fsync moves it little.
        self.durable = if self.durable.is_zero() {
            took
        } else {
            (self.durable * 7 + took) / 8
        };
    }

    /// With `queued` requests in the queue: how many to wait for, and for
    /// how long at most; `None` to commit at once.
    pub(super) fn wait_for(&self, queued: usize, cap: usize) -> Option<(usize, Duration)> {
        let target = self.expect.min(cap);
        if queued == 0 || queued >= target {
            return None;
        }
        let patience = self.durable.min(MAX_PATIENCE);
        (!patience.is_zero()).then_some((target, patience))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn one_publisher_never_waits() {
        let mut g = Gather::default();
        g.committed(1, 0, 150 * US);
        assert_eq!(g.wait_for(1, 8192), None);
    }

    #[test]
    fn two_half_groups_wait_for_each_other() {
        let mut g = Gather::default();
        // 8 fsync'd while 8 queued: the next committer, with those 8 queued
        // and some of the answered ones back, waits for all 16.
        g.committed(8, 8, 150 * US);
        assert_eq!(g.wait_for(8, 8192), Some((16, 150 * US)));
        assert_eq!(g.wait_for(15, 8192), Some((16, 150 * US)));
        assert_eq!(g.wait_for(16, 8192), None);
        assert_eq!(g.wait_for(17, 8192), None);
        // Once joined, nobody queues during the fsync: still 16.
        g.committed(16, 0, 150 * US);
        assert_eq!(g.wait_for(1, 8192), Some((16, 150 * US)));
    }

    #[test]
    fn a_publisher_that_stops_costs_one_wait() {
        let mut g = Gather::default();
        g.committed(16, 0, 150 * US);
        assert!(g.wait_for(15, 8192).is_some());
        // The wait ran out with 15: that group expects only 15 after it.
        g.committed(15, 0, 150 * US);
        assert_eq!(g.wait_for(15, 8192), None);
    }

    #[test]
    fn it_waits_at_most_one_durable_step_and_never_past_the_cap() {
        let mut g = Gather::default();
        g.committed(8, 8, 100 * US);
        // One slow fsync moves the mean by an eighth of the difference.
        g.committed(8, 8, 900 * US);
        assert_eq!(g.wait_for(8, 8192), Some((16, 200 * US)));
        for _ in 0..100 {
            g.committed(8, 8, Duration::from_millis(20));
        }
        assert_eq!(g.wait_for(8, 8192), Some((16, MAX_PATIENCE)));
    }

    #[test]
    fn it_waits_for_no_more_than_a_group_may_hold() {
        let mut g = Gather::default();
        g.committed(64, 64, 150 * US);
        assert_eq!(g.wait_for(32, 100), Some((100, 150 * US)));
        assert_eq!(g.wait_for(100, 100), None);
    }

    #[test]
    fn nothing_waits_with_an_empty_queue_or_no_durable_time() {
        let mut g = Gather::default();
        assert_eq!(g.wait_for(1, 8192), None, "nothing committed yet");
        g.committed(8, 8, Duration::ZERO);
        assert_eq!(g.wait_for(4, 8192), None);
        g.committed(8, 8, 150 * US);
        assert_eq!(g.wait_for(0, 8192), None);
    }
}
