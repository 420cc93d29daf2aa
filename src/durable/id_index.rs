//! The id index: how an event id is found in the log without an index
//! entry per event.
//!
//! Ids made by this process's generator only grow, so most events arrive
//! *in order*: their id is above every earlier id in the log. Those are
//! not indexed one by one; only *out-of-order* ids (imported events, ids
//! made elsewhere) go into `events_by_id`. Among in-order events, some are
//! *marks* (`events_by_id_marks`, id → `seq`):
//! - the first in-order event after an out-of-order one (or after the
//!   sparse start),
//! - the last in-order event before an out-of-order one,
//! - and every 16th in a run of in-order events.
//!
//! So between two consecutive marks the events are all in order (at most
//! 15 of them, their ids increasing with `seq`) or all out of order (each
//! in `events_by_id`). An id not in `events_by_id` is found from the
//! greatest mark at or below it: the events after that mark, up to the
//! next mark, read 16 bytes each, at most 15 of them.
//!
//! Files written before this scheme indexed every event. `META_ID_INDEX`
//! records from which `seq` the sparse rule applies (`sparse_from`); every
//! event before it is in `events_by_id`.
//!
//! Invariants (checked by `check`):
//! - every event at or after `sparse_from` that is not in `events_by_id` has
//!   an id above every earlier id;
//! - every mark names an in-order event by its id;
//! - the events strictly between consecutive marks (and between
//!   `sparse_from` and the first mark) are all in-order or all out of order,
//!   the latter before the first mark.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::codec;
use super::event_blocks::EventTables;
use super::tables::{BY_ID, META, from_bytes, to_bytes};
use crate::error::StorageError;

/// In-order event id (as `u128`) → `seq`, for the marks.
pub(crate) const ID_MARKS: TableDefinition<u128, u64> = TableDefinition::new("events_by_id_marks");

/// `META` key of the [`IndexState`].
pub(crate) const META_ID_INDEX: &str = "id_index";

/// A mark every this many in-order events in a row. 16, not 64: publishing
/// fresh events cost the same (9% less CPU per event than one entry per
/// event, either way), and re-publishing 100k duplicates took 1.15× the
/// full index's time instead of 1.6× (BENCHMARKS.md, "Id index").
const MARK_EVERY: u32 = 16;

/// Where the indexing of the next event stands, stored in `META` with each
/// commit that appends.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct IndexState {
    /// Events from this `seq` on follow the sparse rule.
    pub(crate) sparse_from: u64,
    /// The largest id ever appended (0: none).
    pub(crate) max_id: u128,
    /// The `seq` of the event with `max_id`.
    pub(crate) max_seq: u64,
    /// The last event appended was in order.
    pub(crate) last_in_order: bool,
    /// In-order events since the last mark.
    pub(crate) since_mark: u32,
    /// The `seq` of the last mark.
    pub(crate) last_mark_seq: u64,
}

impl IndexState {
    /// The stored state, if any.
    pub(crate) fn load<T: ReadableTable<&'static str, &'static [u8]>>(
        meta: &T,
    ) -> Result<Option<IndexState>, StorageError> {
        match meta.get(META_ID_INDEX)? {
            Some(v) => Ok(Some(from_bytes(v.value(), "ctrlbus_meta", META_ID_INDEX)?)),
            None => Ok(None),
        }
    }

    fn store(
        &self,
        meta: &mut redb::Table<'_, &'static str, &'static [u8]>,
    ) -> Result<(), StorageError> {
        meta.insert(META_ID_INDEX, to_bytes(self).as_slice())?;
        Ok(())
    }
}

/// Creates the marks table and the state of a file that has none: a new
/// log starts sparse at `seq` 1; an older file, after its last event (every
/// event so far is in `events_by_id`).
pub(crate) fn prepare(txn: &redb::WriteTransaction) -> Result<(), StorageError> {
    txn.open_table(ID_MARKS)?;
    let mut meta = txn.open_table(META)?;
    if IndexState::load(&meta)?.is_some() {
        return Ok(());
    }
    let last_event = EventTables::write(txn)?.bounds()?.map_or(0, |(_, l)| l);
    let retained = match meta.get(super::tables::META_RETAINED)? {
        Some(v) => v.value().try_into().map_or(0, u64::from_be_bytes),
        None => 0,
    };
    let by_id = txn.open_table(BY_ID)?;
    let (max_id, max_seq) = by_id
        .last()?
        .map_or((0, 0), |(k, v)| (k.value(), v.value()));
    IndexState {
        sparse_from: last_event.max(retained) + 1,
        max_id,
        max_seq,
        ..IndexState::default()
    }
    .store(&mut meta)?;
    // From here on a build that indexes every id must not open it.
    meta.insert(
        super::tables::META_FORMAT,
        [super::tables::FORMAT_VERSION].as_slice(),
    )?;
    Ok(())
}

/// Indexes the events of one write transaction, in `seq` order.
pub(crate) struct Indexer<'t> {
    by_id: redb::Table<'t, u128, u64>,
    marks: redb::Table<'t, u128, u64>,
    meta: redb::Table<'t, &'static str, &'static [u8]>,
    state: IndexState,
}

impl<'t> Indexer<'t> {
    /// The indexer of `txn`, from its stored state.
    pub(crate) fn open(txn: &'t redb::WriteTransaction) -> Result<Indexer<'t>, StorageError> {
        let meta = txn.open_table(META)?;
        let state = IndexState::load(&meta)?.ok_or_else(|| StorageError::Corrupted {
            table: "ctrlbus_meta",
            key: META_ID_INDEX.into(),
            reason: "missing".into(),
        })?;
        Ok(Indexer {
            by_id: txn.open_table(BY_ID)?,
            marks: txn.open_table(ID_MARKS)?,
            meta,
            state,
        })
    }

    /// Indexes the event `key` (its id as `u128`) at `seq`.
    pub(crate) fn add(&mut self, key: u128, seq: u64) -> Result<(), StorageError> {
        let s = &mut self.state;
        if seq < s.sparse_from {
            self.by_id.insert(key, seq)?;
            return Ok(());
        }
        if key > s.max_id {
            if !s.last_in_order || s.since_mark + 1 >= MARK_EVERY {
                self.marks.insert(key, seq)?;
                s.since_mark = 0;
                s.last_mark_seq = seq;
            } else {
                s.since_mark += 1;
            }
            s.max_id = key;
            s.max_seq = seq;
            s.last_in_order = true;
        } else {
            if s.last_in_order && s.last_mark_seq != s.max_seq {
                // The in-order run ends here: its last event is a mark.
                self.marks.insert(s.max_id, s.max_seq)?;
                s.last_mark_seq = s.max_seq;
                s.since_mark = 0;
            }
            self.by_id.insert(key, seq)?;
            s.last_in_order = false;
        }
        Ok(())
    }

    /// Stores the state for the next transaction.
    pub(crate) fn finish(mut self) -> Result<(), StorageError> {
        self.state.store(&mut self.meta)
    }
}

/// The `seq` of the event with id `key` (as `u128`), if it is in the log.
///
/// # Errors
/// [`StorageError`] when storage fails or a record read is damaged.
pub(crate) fn find<B, M, E>(
    by_id: &B,
    marks: &M,
    events: &EventTables<E>,
    key: u128,
) -> Result<Option<u64>, StorageError>
where
    B: ReadableTable<u128, u64>,
    M: ReadableTable<u128, u64>,
    E: ReadableTable<u64, &'static [u8]>,
{
    if let Some(seq) = by_id.get(key)? {
        return Ok(Some(seq.value()));
    }
    let Some((mark_id, mark_seq)) = marks
        .range(..=key)?
        .next_back()
        .transpose()?
        .map(|(k, v)| (k.value(), v.value()))
    else {
        // Before the first mark every event is out of order (or indexed).
        return Ok(None);
    };
    if mark_id == key {
        // (A mark whose event retention removed names nothing.)
        return Ok(events.get(mark_seq)?.map(|_| mark_seq));
    }
    let end = match marks.range(key..)?.next().transpose()? {
        Some((_, v)) => v.value(),
        None => u64::MAX,
    };
    let id = |seq: u64, bytes: &[u8]| -> Result<u128, StorageError> {
        codec::id_of(bytes)
            .map(u128::from_be_bytes)
            .map_err(|reason| StorageError::Corrupted {
                table: "events",
                key: seq.to_string(),
                reason,
            })
    };
    if end <= mark_seq + 1 {
        return Ok(None);
    }
    let mut rows = events.rows(mark_seq + 1, end - 1, false)?;
    while let Some(row) = rows.next() {
        let (seq, bytes) = row?;
        let found = id(seq, bytes)?;
        if found < mark_id {
            return Ok(None); // an out-of-order stretch: `key` isn't in it
        }
        if found == key {
            return Ok(Some(seq));
        }
        if found > key {
            return Ok(None);
        }
    }
    Ok(None)
}

/// Removes the index entries of events that retention removed; the oldest
/// event left becomes a mark if it is in order (the marks before it are
/// gone with their events).
pub(crate) fn forget(
    txn: &redb::WriteTransaction,
    removed: &[(u64, [u8; 16])],
) -> Result<(), StorageError> {
    let mut by_id = txn.open_table(BY_ID)?;
    let mut marks = txn.open_table(ID_MARKS)?;
    for (_, id) in removed {
        let key = u128::from_be_bytes(*id);
        by_id.remove(key)?;
        marks.remove(key)?;
    }
    let events = EventTables::write(txn)?;
    let oldest = match events.bounds()? {
        Some((seq, _)) => events.get(seq)?.map(|r| (seq, r)),
        None => None,
    };
    if let Some((seq, record)) = oldest {
        let key = u128::from_be_bytes(codec::id_of(record.bytes()).map_err(|reason| {
            StorageError::Corrupted {
                table: "events",
                key: seq.to_string(),
                reason,
            }
        })?);
        let meta = txn.open_table(META)?;
        let sparse_from = IndexState::load(&meta)?.map_or(u64::MAX, |s| s.sparse_from);
        if seq >= sparse_from && by_id.get(key)?.is_none() {
            marks.insert(key, seq)?;
        }
    }
    Ok(())
}

/// [`find`] in a read transaction (a file from before the marks has none:
/// every event is in `events_by_id`).
pub(crate) fn find_in(txn: &redb::ReadTransaction, key: u128) -> Result<Option<u64>, StorageError> {
    let by_id = txn.open_table(BY_ID)?;
    match txn.open_table(ID_MARKS) {
        Ok(marks) => find(&by_id, &marks, &EventTables::read(txn)?, key),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(by_id.get(key)?.map(|v| v.value())),
        Err(e) => Err(e.into()),
    }
}

/// The largest id in the log's index state (0 for none).
pub(crate) fn max_id(txn: &redb::ReadTransaction) -> Result<u128, StorageError> {
    let from_state = match txn.open_table(META) {
        Ok(meta) => IndexState::load(&meta)?.map_or(0, |s| s.max_id),
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => return Err(e.into()),
    };
    let indexed = txn.open_table(BY_ID)?.last()?.map_or(0, |(k, _)| k.value());
    Ok(from_state.max(indexed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::tables::EVENTS;
    use crate::event::{Event, Type};
    use redb::{ReadableDatabase, ReadableTableMetadata};

    fn db() -> redb::Database {
        redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap()
    }

    /// A new log's tables, as `open` makes them.
    fn fresh() -> redb::Database {
        let db = db();
        let txn = db.begin_write().unwrap();
        txn.open_table(EVENTS).unwrap();
        txn.open_table(BY_ID).unwrap();
        txn.open_table(super::super::tables::CURSORS).unwrap();
        prepare(&txn).unwrap();
        txn.commit().unwrap();
        db
    }

    fn record(id: u128) -> Vec<u8> {
        let mut e = Event::new(Type::DEPLOY_STARTED, "t");
        e.id = crate::EventId::from_bytes(id.to_be_bytes());
        let mut out = Vec::new();
        codec::encode(&e, 1, &[], &mut out);
        out
    }

    /// Appends `ids` after what `db` holds, one transaction each `chunk`.
    fn append(db: &redb::Database, first_seq: u64, ids: &[u128], chunk: usize) {
        for (c, part) in ids.chunks(chunk).enumerate() {
            let txn = db.begin_write().unwrap();
            {
                let mut events = EventTables::write(&txn).unwrap();
                let mut ix = Indexer::open(&txn).unwrap();
                let start = first_seq + (c * chunk) as u64;
                let records: Vec<Vec<u8>> = part.iter().map(|id| record(*id)).collect();
                for (i, id) in part.iter().enumerate() {
                    ix.add(*id, start + i as u64).unwrap();
                }
                ix.finish().unwrap();
                events
                    .append((start..).zip(records.iter().map(Vec::as_slice)))
                    .unwrap();
            }
            txn.commit().unwrap();
        }
    }

    fn find_id(db: &redb::Database, id: u128) -> Option<u64> {
        find_in(&db.begin_read().unwrap(), id).unwrap()
    }

    fn check(db: &redb::Database) -> Vec<String> {
        crate::durable::upkeep::check(db, None, &[], &mut |_, _| {})
            .unwrap()
            .problems
    }

    /// In-order runs (longer and shorter than a mark's stride), out-of-order
    /// runs and single ones, appended in chunks.
    fn mixed_ids(seed: u64) -> Vec<u128> {
        let mut rng = seed;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            rng >> 33
        };
        let mut ids = Vec::new();
        let mut top: u128 = 1 << 100;
        for _ in 0..40 {
            let run = next() % 150 + 1;
            if next() % 3 == 0 {
                for _ in 0..run {
                    // Below the top: out of order (distinct, odd).
                    ids.push((u128::from(next()) << 20 | 1) + (ids.len() as u128) * 2);
                }
            } else {
                for _ in 0..run {
                    top += u128::from(next() % 1000 + 2) * 2;
                    ids.push(top);
                }
            }
        }
        ids
    }

    #[test]
    fn every_event_is_found_by_its_id_and_no_other_id_is() {
        for seed in 1..6 {
            let db = fresh();
            let ids = mixed_ids(seed);
            append(&db, 1, &ids, 37);
            for (i, id) in ids.iter().enumerate() {
                assert_eq!(
                    find_id(&db, *id),
                    Some(i as u64 + 1),
                    "seed {seed}, seq {}",
                    i + 1
                );
                // Neighbours that are not in the log are not found.
                for other in [id + 1, id - 1] {
                    if !ids.contains(&other) {
                        assert_eq!(find_id(&db, other), None, "seed {seed}: {other}");
                    }
                }
            }
            assert_eq!(find_id(&db, 0), None);
            assert_eq!(find_id(&db, u128::MAX), None);
            let txn = db.begin_read().unwrap();
            let indexed = txn.open_table(BY_ID).unwrap().len().unwrap();
            let marks = txn.open_table(ID_MARKS).unwrap().len().unwrap();
            assert!(
                (indexed + marks) < ids.len() as u64,
                "fewer entries than events: {indexed} + {marks} of {}",
                ids.len()
            );
            drop(txn);
            assert_eq!(check(&db), Vec::<String>::new(), "seed {seed}");
        }
    }

    #[test]
    fn a_file_indexed_in_full_keeps_its_entries_and_goes_sparse_after() {
        let db = db();
        // As an older build wrote it: every id in `events_by_id`, no state.
        let old: Vec<u128> = (1..=100).map(|i| i * 10).collect();
        let txn = db.begin_write().unwrap();
        {
            let mut events = txn.open_table(EVENTS).unwrap();
            let mut by_id = txn.open_table(BY_ID).unwrap();
            txn.open_table(META).unwrap();
            txn.open_table(super::super::tables::CURSORS).unwrap();
            for (i, id) in old.iter().enumerate() {
                events.insert(i as u64 + 1, record(*id).as_slice()).unwrap();
                by_id.insert(*id, i as u64 + 1).unwrap();
            }
        }
        txn.commit().unwrap();
        let txn = db.begin_write().unwrap();
        prepare(&txn).unwrap();
        txn.commit().unwrap();
        let format = db
            .begin_read()
            .unwrap()
            .open_table(META)
            .unwrap()
            .get(super::super::tables::META_FORMAT)
            .unwrap()
            .map(|v| v.value().to_vec());
        assert_eq!(
            format,
            Some(vec![super::super::tables::FORMAT_VERSION]),
            "upgraded: a version-1 build refuses it"
        );
        let new: Vec<u128> = (1..=200).map(|i| 5000 + i).chain([15, 25]).collect();
        append(&db, 101, &new, 50);
        for (i, id) in old.iter().chain(&new).enumerate() {
            assert_eq!(find_id(&db, *id), Some(i as u64 + 1));
        }
        assert_eq!(find_id(&db, 5), None);
        assert_eq!(find_id(&db, 5000), None);
        assert_eq!(check(&db), Vec::<String>::new());
        let txn = db.begin_read().unwrap();
        assert_eq!(
            txn.open_table(BY_ID).unwrap().len().unwrap(),
            102,
            "the old entries and the two out-of-order ids"
        );
    }

    #[test]
    fn after_retention_the_rest_is_still_found_and_a_missing_entry_is_reported() {
        let db = fresh();
        let ids = mixed_ids(9);
        append(&db, 1, &ids, 64);
        for cut in [1usize, 30, 31, 200, 500] {
            let txn = db.begin_write().unwrap();
            let removed: Vec<(u64, [u8; 16])> = {
                let mut events = EventTables::write(&txn).unwrap();
                let first = events.bounds().unwrap().unwrap().0;
                let out: Vec<_> = (first..=cut as u64)
                    .map(|s| (s, ids[s as usize - 1].to_be_bytes()))
                    .collect();
                events.remove_through(cut as u64).unwrap();
                out
            };
            forget(&txn, &removed).unwrap();
            txn.commit().unwrap();
            for (i, id) in ids.iter().enumerate() {
                let want = (i >= cut).then_some(i as u64 + 1);
                assert_eq!(find_id(&db, *id), want, "cut {cut}, seq {}", i + 1);
            }
            assert_eq!(check(&db), Vec::<String>::new(), "cut {cut}");
        }
        // An out-of-order event's entry lost: `check` says so.
        let txn = db.begin_write().unwrap();
        let gone = {
            let mut by_id = txn.open_table(BY_ID).unwrap();
            let (k, _) = by_id
                .last()
                .unwrap()
                .map(|(k, v)| (k.value(), v.value()))
                .unwrap();
            by_id.remove(k).unwrap();
            k
        };
        txn.commit().unwrap();
        let problems = check(&db);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("missing from the id index")),
            "{gone}: {problems:?}"
        );
    }
}
