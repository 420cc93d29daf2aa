//! The acknowledged events the redb file does not hold yet, for reads in
//! this process (`read`, `recent_events`, a durable subscription's start
//! and catch-up). A read used to make the applier commit first
//! (`ensure_applied`): a durable redb commit, 5–30 ms under load, and
//! longer behind a retention chunk. Now it takes a [`Snapshot`]: the `seq`
//! the file holds through, and the groups above it, whose records the
//! applier holds in memory anyway. It reads the file up to that `seq` and
//! the records after it.
//!
//! Invariants:
//! - [`Tail`] holds, in `seq` order and without a gap, every group
//!   acknowledged through the WAL that may not be in the file yet: the
//!   committer pushes a group before it hands it to the applier, and so
//!   before any of its publishers is answered; the applier releases groups
//!   only after it has stored the `applied_seq` that covers them.
//! - So, under the tail's lock, every record above the `applied_seq` read
//!   there is in the tail, and a read transaction begun after that read
//!   holds every record up to it.
//! - Without a WAL (the applier runs inline, before the answer) the tail
//!   stays empty.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Shared;
use super::codec;
use crate::error::StorageError;

/// One acknowledged group's records: `records[i]` has `seq` `first + i`.
#[derive(Clone)]
pub(crate) struct TailGroup {
    pub(crate) first: u64,
    pub(crate) records: Arc<Vec<Vec<u8>>>,
}

impl TailGroup {
    /// The `seq` of its last record.
    fn last(&self) -> u64 {
        self.first + self.records.len() as u64 - 1
    }
}

/// The groups acknowledged through the WAL and maybe not applied yet.
#[derive(Default)]
pub(crate) struct Tail {
    groups: VecDeque<TailGroup>,
}

impl Tail {
    /// A group the committer acknowledges (non-empty, right after the last).
    pub(crate) fn push(&mut self, first: u64, records: Arc<Vec<Vec<u8>>>) {
        debug_assert!(!records.is_empty());
        debug_assert!(self.groups.back().is_none_or(|g| g.last() + 1 == first));
        self.groups.push_back(TailGroup { first, records });
    }

    /// Forgets the groups the file holds (all at or below `applied`).
    pub(crate) fn release(&mut self, applied: u64) {
        while self.groups.front().is_some_and(|g| g.last() <= applied) {
            self.groups.pop_front();
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.groups.len()
    }
}

/// What a read sees: the file through `applied`, then `groups`' records
/// above it.
pub(crate) struct Snapshot {
    /// The file holds every record through this `seq`; the read takes no
    /// record above it from the file.
    pub(crate) applied: u64,
    /// The groups with records above `applied`, in `seq` order.
    pub(crate) groups: Vec<TailGroup>,
}

impl Snapshot {
    /// The file alone (another process's read-only view, or no WAL).
    pub(crate) fn file_only() -> Snapshot {
        Snapshot {
            applied: u64::MAX,
            groups: Vec::new(),
        }
    }

    /// The snapshot, and a read transaction begun after it (so it holds
    /// every record through `applied`): what every read in this process
    /// starts from. A bus poisoned by a failed apply still reads the
    /// acknowledged records: they are what a reopen recovers from the WAL.
    ///
    /// # Errors
    /// [`StorageError`] when redb can't begin a read.
    pub(crate) fn begin(
        shared: &Shared,
    ) -> Result<(redb::ReadTransaction, Snapshot), StorageError> {
        let snap = Snapshot::take(shared);
        let txn = redb::ReadableDatabase::begin_read(&shared.db)?;
        Ok((txn, snap))
    }

    /// Takes the snapshot (see [`Snapshot::begin`]).
    fn take(shared: &Shared) -> Snapshot {
        let tail = shared.tail.lock();
        let applied = shared.applied_seq.load(Ordering::Acquire);
        let groups = tail
            .groups
            .iter()
            .filter(|g| g.last() > applied)
            .cloned()
            .collect();
        Snapshot { applied, groups }
    }

    /// The `seq` of the newest record in memory.
    pub(crate) fn last(&self) -> Option<u64> {
        self.groups.last().map(TailGroup::last)
    }

    /// The `seq` of the oldest record in memory (just above `applied`).
    pub(crate) fn first(&self) -> Option<u64> {
        self.last().map(|_| self.applied + 1)
    }

    /// Every record in memory from `seq` on, oldest first.
    pub(crate) fn records_from(&self, seq: u64) -> impl DoubleEndedIterator<Item = (u64, &[u8])> {
        let from = seq.max(self.applied.saturating_add(1));
        self.groups.iter().flat_map(move |g| {
            g.records
                .iter()
                .enumerate()
                .map(|(i, r)| (g.first + i as u64, r.as_slice()))
                .filter(move |(s, _)| *s >= from)
        })
    }

    /// The `seq` of the record in memory with this id (`id_key`).
    ///
    /// # Errors
    /// The reason and `seq` of a record that does not decode.
    pub(crate) fn find_id(&self, key: u128) -> Result<Option<u64>, (u64, String)> {
        for (seq, record) in self.records_from(0) {
            let (_, rec) = codec::decode_ref(record).map_err(|r| (seq, r))?;
            if super::tables::id_key(rec.id) == key {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }

    /// The first record in memory appended at or after `target_ns`.
    ///
    /// # Errors
    /// The reason and `seq` of a record whose header does not decode.
    pub(crate) fn seek_time(&self, target_ns: i64) -> Result<Option<u64>, (u64, String)> {
        for (seq, record) in self.records_from(0) {
            if codec::append_ns(record).map_err(|r| (seq, r))? >= target_ns {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::durable::{DurableBus, LogEntry, Position};
    use crate::error::ReadError;
    use crate::event::{Event, Type};
    use crate::filter::Filter;
    use crate::id::EventId;

    fn applied(bus: &DurableBus) -> u64 {
        bus.shared().applied_seq.load(Ordering::Acquire)
    }

    fn entries(bus: &DurableBus, from: Position, filter: &Filter) -> Vec<LogEntry> {
        bus.read(from, filter)
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn seqs(entries: &[LogEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.seq).collect()
    }

    /// Seqs 1-5 in the file, 6-10 acknowledged through the WAL only: every
    /// position and filter reads across the two as it reads the file
    /// alone, without making the applier commit; after the apply, the same
    /// reads give the same answers.
    #[test]
    fn reads_cross_from_the_file_to_the_unapplied_events_without_waiting_for_the_applier() {
        let dir = tempfile::tempdir().unwrap();
        let bus = DurableBus::builder()
            .apply_interval(std::time::Duration::from_secs(3600))
            .open(dir.path().join("log.redb"))
            .unwrap();
        let event = |i: u64| {
            let tenant = if i.is_multiple_of(3) { "b" } else { "a" };
            Event::new(Type::DEPLOY_STARTED, tenant).with_payload_value("i", i)
        };
        let mut ids: Vec<EventId> = Vec::new();
        for i in 1..=5 {
            ids.push(bus.publish(event(i)).unwrap().id);
        }
        bus.sync_reads().unwrap();
        assert_eq!(applied(&bus), 5);
        for i in 6..=8 {
            ids.push(bus.publish(event(i)).unwrap().id);
        }
        let batch = bus.publish_batch(vec![event(9), event(10)]).unwrap();
        ids.extend(batch.iter().map(|r| r.id));

        let all = Filter::all();
        let b = Filter::all().tenant("b");
        // Every read, as (what, seqs); run before and after the apply.
        let reads = |bus: &DurableBus| -> Vec<(String, Vec<u64>)> {
            let full = entries(bus, Position::Beginning, &all);
            let t = |seq: u64| full[seq as usize - 1].appended_at;
            let mut out = vec![("beginning".to_string(), seqs(&full))];
            for (what, from) in [
                ("seq 3", Position::Seq(3)),
                ("seq 7", Position::Seq(7)),
                ("seq 11", Position::Seq(11)),
                ("end", Position::End),
                ("id 2", Position::Id(ids[1])),
                ("id 8", Position::Id(ids[7])),
                ("time 3", Position::Time(t(3))),
                ("time 7", Position::Time(t(7))),
                ("time 10", Position::Time(t(10))),
                (
                    "time after",
                    Position::Time(t(10) + jiff::SignedDuration::from_secs(1)),
                ),
            ] {
                out.push((what.into(), seqs(&entries(bus, from, &all))));
            }
            out.push((
                "tenant b".into(),
                seqs(&entries(bus, Position::Beginning, &b)),
            ));
            out.push((
                "tenant b from seq 4".into(),
                seqs(&entries(bus, Position::Seq(4), &b)),
            ));
            let until: Vec<u64> = bus
                .read(Position::Seq(2), &all)
                .unwrap()
                .until(t(7))
                .map(|e| e.unwrap().seq)
                .collect();
            out.push(("seq 2 until time 7".into(), until));
            let mut reader = bus.read(Position::Seq(4), &b).unwrap();
            let got: Vec<u64> = reader.by_ref().map(|e| e.unwrap().seq).collect();
            out.push((
                "tenant b from 4, then next_seq".into(),
                [got, vec![reader.next_seq()]].concat(),
            ));
            for n in [0, 3, 7, 20] {
                let recent: Vec<EventId> = bus
                    .recent_events(n, &all)
                    .unwrap()
                    .iter()
                    .map(|e| e.id)
                    .collect();
                let want: Vec<EventId> = ids[ids.len().saturating_sub(n)..].to_vec();
                assert_eq!(recent, want, "recent {n}");
            }
            let recent_b: Vec<EventId> = bus
                .recent_events(2, &b)
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect();
            assert_eq!(recent_b, vec![ids[5], ids[8]], "recent 2 of tenant b");
            assert!(matches!(
                bus.read(Position::Id(EventId::new()), &all),
                Err(ReadError::UnknownEvent(_))
            ));
            out
        };
        let before = reads(&bus);
        assert_eq!(applied(&bus), 5, "a read made the applier commit");
        assert_eq!(
            bus.shared().tail.lock().len(),
            4,
            "three publishes and a batch"
        );
        let want: Vec<(&str, Vec<u64>)> = vec![
            ("beginning", (1..=10).collect()),
            ("seq 3", (3..=10).collect()),
            ("seq 7", (7..=10).collect()),
            ("seq 11", vec![]),
            ("end", vec![]),
            ("id 2", (2..=10).collect()),
            ("id 8", (8..=10).collect()),
            ("time 3", (3..=10).collect()),
            ("time 7", (7..=10).collect()),
            ("time 10", (9..=10).collect()),
            ("time after", vec![]),
            ("tenant b", vec![3, 6, 9]),
            ("tenant b from seq 4", vec![6, 9]),
            ("seq 2 until time 7", (2..=7).collect()),
            ("tenant b from 4, then next_seq", vec![6, 9, 11]),
        ];
        let got: Vec<(&str, Vec<u64>)> = before
            .iter()
            .map(|(w, s)| (w.as_str(), s.clone()))
            .collect();
        assert_eq!(got, want);
        // Each entry is the event published.
        let full = entries(&bus, Position::Beginning, &all);
        assert_eq!(full.iter().map(|e| e.event.id).collect::<Vec<_>>(), ids);
        assert_eq!(full[6].event, {
            let mut e = event(7);
            e.id = ids[6];
            e.timestamp = full[6].event.timestamp;
            e
        });

        bus.sync_reads().unwrap();
        assert_eq!(applied(&bus), 10);
        assert_eq!(
            bus.shared().tail.lock().len(),
            0,
            "applied groups are released"
        );
        assert_eq!(reads(&bus), before, "the same reads once applied");
    }

    fn group(first: u64, n: usize) -> (u64, Arc<Vec<Vec<u8>>>) {
        (first, Arc::new((0..n).map(|i| vec![i as u8]).collect()))
    }

    /// A durable subscription started at events only the WAL holds (by
    /// id, time or seq) catches up on them from memory, without making the
    /// applier commit.
    #[test]
    fn a_durable_subscription_catches_up_from_memory_without_an_apply() {
        let dir = tempfile::tempdir().unwrap();
        // No timed apply, and no timed flush of the subscriptions'
        // positions (which applies too: under CI's load the default 100 ms
        // passed mid-test and made this fail for that reason).
        let bus = DurableBus::builder()
            .apply_interval(std::time::Duration::from_secs(3600))
            .ack_flush_interval(std::time::Duration::from_secs(3600))
            .open(dir.path().join("log.redb"))
            .unwrap();
        let ids: Vec<EventId> = (0..6)
            .map(|i| {
                let e = Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("i", i);
                bus.publish(e).unwrap().id
            })
            .collect();
        let times: Vec<_> = entries(&bus, Position::Beginning, &Filter::all())
            .iter()
            .map(|e| e.appended_at)
            .collect();
        assert_eq!(applied(&bus), 0);
        // All four kept running: dropping one stores its position durably,
        // which applies.
        let mut subs = Vec::new();
        for (name, start, want) in [
            ("beginning", Position::Beginning, &ids[..]),
            ("by-id", Position::Id(ids[2]), &ids[2..]),
            ("by-time", Position::Time(times[4]), &ids[4..]),
            ("by-seq", Position::Seq(6), &ids[5..]),
        ] {
            let seen = Arc::new(crate::sync::Mutex::new(Vec::new()));
            let keep = seen.clone();
            let sub = bus
                .subscribe_durable(name, Filter::all(), start, move |e: &Event| {
                    keep.lock().push(e.id);
                    Ok(())
                })
                .unwrap();
            assert!(sub.wait_live(std::time::Duration::from_secs(10)), "{name}");
            assert_eq!(seen.lock().as_slice(), want, "{name}");
            subs.push(sub);
        }
        assert_eq!(applied(&bus), 0, "catching up made the applier commit");
        drop(subs);
    }

    #[test]
    fn release_forgets_whole_groups_at_or_below_applied() {
        let mut tail = Tail::default();
        for (first, n) in [(1, 3), (4, 1), (5, 4)] {
            let (f, r) = group(first, n);
            tail.push(f, r);
        }
        tail.release(2);
        assert_eq!(tail.len(), 3, "group 1-3 is not all applied");
        tail.release(4);
        assert_eq!(tail.len(), 1);
        tail.release(8);
        assert_eq!(tail.len(), 0);
    }

    #[test]
    fn a_snapshot_reads_only_above_applied() {
        let snap = Snapshot {
            applied: 2,
            groups: vec![
                TailGroup {
                    first: 1,
                    records: group(1, 3).1,
                },
                TailGroup {
                    first: 4,
                    records: group(4, 2).1,
                },
            ],
        };
        let seqs: Vec<u64> = snap.records_from(0).map(|(s, _)| s).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        let seqs: Vec<u64> = snap.records_from(5).map(|(s, _)| s).collect();
        assert_eq!(seqs, vec![5]);
        let back: Vec<u64> = snap.records_from(0).rev().map(|(s, _)| s).collect();
        assert_eq!(back, vec![5, 4, 3]);
        assert_eq!((snap.first(), snap.last()), (Some(3), Some(5)));
        assert_eq!(Snapshot::file_only().first(), None);
    }
}
