//! Upkeep: statistics, integrity checks, retention, compaction and the
//! recent-events view.

use std::path::Path;

use jiff::Timestamp;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::Serialize;

use super::Shared;
use super::codec;
use super::event_blocks::{EventTables, RowError};
use super::read;
use super::read_tail::Snapshot;
use super::tables::{
    BY_ID, CURSORS, CursorRecord, META, META_RETAINED, from_bytes, id_key, to_bytes,
};
use crate::error::{OpenError, ReadError, StorageError};
use crate::event::Event;
use crate::filter::Filter;
use crate::time::{now_ns, ts};

/// Counts and bounds of a log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// Events stored.
    pub events: u64,
    /// Oldest retained `seq` (0 if empty).
    pub first_seq: u64,
    /// Newest `seq` ever assigned (0 if none).
    pub last_seq: u64,
    /// Append time of the oldest retained event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_appended_at: Option<Timestamp>,
    /// Append time of the newest event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_appended_at: Option<Timestamp>,
    /// Durable subscriptions.
    pub cursors: u64,
    /// Acknowledged events not yet in the redb file (`ctrlbus_apply_lag_events`):
    /// for the open bus, those the applier has still to apply; for a file
    /// read from outside, those only in its write-ahead log.
    pub apply_lag_events: u64,
    /// Per durable subscription, the events appended after its position
    /// (`ctrlbus_subscription_lag_events`; as `lag` in `cursors`).
    pub subscription_lag: std::collections::BTreeMap<String, u64>,
    /// Bytes of the file, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_bytes: Option<u64>,
}

pub(crate) fn stats<D: ReadableDatabase>(
    db: &D,
    path: Option<&Path>,
) -> Result<Stats, StorageError> {
    let txn = db.begin_read()?;
    let events = EventTables::read(&txn)?;
    let bounds = events.bounds()?;
    let time_of = |seq: u64| -> Result<Option<Timestamp>, StorageError> {
        Ok(match events.get(seq)? {
            Some(r) => Some(ts(
                codec::append_ns(r.bytes()).map_err(|r| read::corrupted(seq, r))?
            )),
            None => None,
        })
    };
    let (first_appended_at, last_appended_at) = match bounds {
        Some((f, l)) => (time_of(f)?, time_of(l)?),
        None => (None, None),
    };
    let last_seq = read::last_assigned(&txn)?;
    let cursors = txn.open_table(CURSORS)?;
    let mut subscription_lag = std::collections::BTreeMap::new();
    for kv in cursors.iter()? {
        let (k, v) = kv?;
        let rec: CursorRecord = from_bytes(v.value(), "cursors", k.value())?;
        subscription_lag.insert(k.value().to_owned(), last_seq.saturating_sub(rec.delivered));
    }
    Ok(Stats {
        events: events.count()?,
        first_seq: bounds.map_or(0, |b| b.0),
        last_seq,
        first_appended_at,
        last_appended_at,
        cursors: cursors.len()?,
        apply_lag_events: 0,
        subscription_lag,
        file_bytes: path
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len()),
    })
}

/// What `check` found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CheckReport {
    /// Records verified.
    pub events_checked: u64,
    /// Id-index entries verified.
    pub index_entries_checked: u64,
    /// Cursors verified.
    pub cursors_checked: u64,
    /// Acknowledged events in the write-ahead log and not yet in the file.
    /// While the owner runs, these are applied within `apply_interval`;
    /// with no owner (after a crash) they are a problem until a writable
    /// open recovers them.
    pub wal_pending_events: u64,
    /// Every problem found, one line each (empty when sound).
    pub problems: Vec<String>,
}

impl CheckReport {
    /// True when no problem was found.
    pub fn is_sound(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What the id index must hold, followed along `seq` (see `id_index`).
#[derive(Default)]
struct IdCheck {
    /// The largest id so far.
    max: u128,
    /// The kind of the events since the last mark: `Some(true)` out of
    /// order (indexed), `Some(false)` in order.
    stretch: Option<bool>,
    /// A mark has been seen since the sparse start.
    marked: bool,
}

impl IdCheck {
    /// Looks at the event `key` at `seq`: whether it is in `events_by_id`
    /// (`indexed`) or a mark, and whether the sparse rule applies to it.
    fn next(
        &mut self,
        seq: u64,
        key: u128,
        indexed: bool,
        marked: bool,
        sparse: bool,
    ) -> Option<String> {
        let above = key > self.max;
        self.max = self.max.max(key);
        if !sparse {
            return (!indexed).then(|| format!("seq {seq}: missing from the id index"));
        }
        if marked {
            self.marked = true;
            self.stretch = None;
            return indexed.then(|| format!("seq {seq}: both marked and indexed"));
        }
        if !indexed && !above {
            return Some(format!("seq {seq}: missing from the id index"));
        }
        if !indexed && !self.marked {
            return Some(format!("seq {seq}: an in-order event before any id mark"));
        }
        match self.stretch {
            Some(kind) if kind != indexed => Some(format!(
                "seq {seq}: in-order and out-of-order events between two id marks"
            )),
            _ => {
                self.stretch = Some(indexed);
                None
            }
        }
    }
}

/// What an id-index entry (or mark) for `key` finds at `seq`.
#[derive(PartialEq, Eq)]
enum Named {
    It,
    Another,
    Nothing,
    Unreadable,
}

/// Reads only the record's id (`codec::id_of`): the records themselves
/// are decoded once, by `check`'s pass over `events`.
fn entry_names(
    events: &EventTables<redb::ReadOnlyTable<u64, &'static [u8]>>,
    seq: u64,
    key: u128,
) -> Result<Named, StorageError> {
    let found = match events.get(seq) {
        Ok(found) => found,
        // A damaged block is reported where records are checked.
        Err(StorageError::Corrupted { .. }) => return Ok(Named::Unreadable),
        Err(e) => return Err(e),
    };
    Ok(match found {
        None => Named::Nothing,
        Some(rec) => match codec::id_of(rec.bytes()) {
            Ok(id) if id_key(id) == key => Named::It,
            Ok(_) => Named::Another,
            Err(_) => Named::Unreadable,
        },
    })
}

/// Verifies every record (decodes, append times non-decreasing, `seq`s
/// contiguous), the id index (every event findable by its id: see
/// `id_index`), and every cursor record.
pub(crate) fn check<D: ReadableDatabase>(
    db: &D,
    path: Option<&Path>,
    hooks: &[std::sync::Arc<dyn super::AppendHook>],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport, StorageError> {
    const MAX_PROBLEMS: usize = 1000;
    let mut report = CheckReport::default();
    let txn = db.begin_read()?;
    let events = EventTables::read(&txn)?;
    let by_id = txn.open_table(BY_ID)?;
    let marks = match txn.open_table(super::id_index::ID_MARKS) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.into()),
    };
    // Before the sparse start (or in a file from before it) every event is
    // in the id index.
    let sparse_from = match txn.open_table(META) {
        Ok(meta) => super::id_index::IndexState::load(&meta)?.map_or(u64::MAX, |s| s.sparse_from),
        Err(_) => u64::MAX,
    };
    let mut ids = IdCheck::default();
    // (For progress only: a damaged newest block is reported below.)
    let total = events.count().unwrap_or(0);
    let problem = |report: &mut CheckReport, p: String| {
        if report.problems.len() < MAX_PROBLEMS {
            report.problems.push(p);
        }
    };
    let mut prev: Option<(u64, i64)> = None;
    let mut rows = events.rows(0, u64::MAX, false)?;
    while let Some(row) = rows.next() {
        let (seq, bytes) = match row {
            Ok(row) => row,
            Err(RowError::Damaged { seq, reason }) => {
                report.events_checked += 1;
                problem(&mut report, format!("seq {seq}: damaged block: {reason}"));
                // The `seq` is there, unreadable: not a gap.
                prev = Some((seq, prev.map_or(i64::MIN, |p| p.1)));
                continue;
            }
            Err(RowError::Storage(e)) => return Err(e),
        };
        report.events_checked += 1;
        if report.events_checked % 4096 == 0 {
            progress(report.events_checked, total);
        }
        match codec::decode_ref(bytes) {
            Err(r) => problem(&mut report, format!("seq {seq}: undecodable record: {r}")),
            Ok((append, rec)) => {
                if let Err(r) = rec.to_event() {
                    problem(&mut report, format!("seq {seq}: invalid event: {r}"));
                }
                if let Some((ps, pa)) = prev {
                    if seq != ps + 1 {
                        problem(&mut report, format!("seq {seq}: gap after seq {ps}"));
                    }
                    if append < pa {
                        problem(
                            &mut report,
                            format!("seq {seq}: append time goes backwards"),
                        );
                    }
                }
                let key = id_key(rec.id);
                let indexed = match by_id.get(key)? {
                    Some(s) if s.value() == seq => true,
                    Some(s) => {
                        problem(
                            &mut report,
                            format!("seq {seq}: id index points to seq {}", s.value()),
                        );
                        true
                    }
                    None => false,
                };
                let marked = match &marks {
                    Some(m) => m.get(key)?.is_some_and(|s| s.value() == seq),
                    None => false,
                };
                if let Some(p) = ids.next(seq, key, indexed, marked, seq >= sparse_from) {
                    problem(&mut report, p);
                }
                prev = Some((seq, append));
            }
        }
    }
    progress(report.events_checked, total);
    for kv in marks.iter().flat_map(|m| m.iter().into_iter().flatten()) {
        let (k, v) = kv?;
        report.index_entries_checked += 1;
        let seq = v.value();
        if entry_names(&events, seq, k.value())? != Named::It {
            problem(
                &mut report,
                format!(
                    "id mark {} does not name the event at seq {seq}",
                    crate::EventId::from_bytes(k.value().to_be_bytes())
                ),
            );
        }
    }
    for kv in by_id.iter()? {
        let (k, v) = kv?;
        report.index_entries_checked += 1;
        let seq = v.value();
        match entry_names(&events, seq, k.value())? {
            Named::Nothing => problem(
                &mut report,
                format!(
                    "id index entry {} points to missing seq {seq}",
                    crate::EventId::from_bytes(k.value().to_be_bytes())
                ),
            ),
            Named::Another => problem(
                &mut report,
                format!("id index entry for seq {seq} names another event"),
            ),
            // An unreadable record is reported where records are checked.
            Named::It | Named::Unreadable => {}
        }
    }
    let last = read::last_assigned(&txn)?;
    for kv in txn.open_table(CURSORS)?.iter()? {
        let (k, v) = kv?;
        report.cursors_checked += 1;
        match from_bytes::<CursorRecord>(v.value(), "cursors", k.value()) {
            Err(e) => problem(&mut report, e.to_string()),
            Ok(rec) => {
                if serde_json::from_str::<Filter>(&rec.filter_json).is_err() {
                    problem(&mut report, format!("cursor {}: invalid filter", k.value()));
                }
                if rec.delivered > last {
                    problem(
                        &mut report,
                        format!(
                            "cursor {}: position {} is past the log's end {last}",
                            k.value(),
                            rec.delivered
                        ),
                    );
                }
            }
        }
    }
    for hook in hooks {
        hook.check(&txn, &mut report.problems)?;
    }
    if let Some(path) = path {
        super::recovery::check_wal(&txn, path, &mut report)?;
    }
    Ok(report)
}

/// Which events retention removes: the oldest, until every limit given holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// Remove events appended longer ago than this.
    pub max_age: Option<std::time::Duration>,
    /// Keep at most this many events.
    pub max_events: Option<u64>,
    /// Keep at most about this many bytes of records.
    pub max_bytes: Option<u64>,
}

/// What one retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetainReport {
    /// Events removed.
    pub removed: u64,
    /// The oldest `seq` left (0 if the log is now empty).
    pub first_seq: u64,
}

/// Events removed per retention transaction. 2,000, not 10,000: a chunk
/// holds redb's write lock, which the applier (and with it every read in
/// the process) waits for; 10,000 took ~32 ms a chunk (BENCHMARKS.md,
/// "Retention under load").
pub(crate) const RETAIN_CHUNK: u64 = 2_000;

/// Removes the oldest events per `policy`, in chunks of one transaction
/// each (`RETAIN_CHUNK` events), keeping `seq`s unique forever
/// (`retained_through`); `between` runs after each chunk that removed a
/// full chunk (the explicit `retain` lets the applier catch up there).
pub(crate) fn retain(
    shared: &Shared,
    policy: &Retention,
    between: &mut dyn FnMut(),
) -> Result<RetainReport, StorageError> {
    let mut report = RetainReport::default();
    loop {
        let chunk = retain_chunk(shared, policy)?;
        report.removed += chunk.removed;
        report.first_seq = chunk.first_seq;
        if chunk.removed < RETAIN_CHUNK {
            return Ok(report);
        }
        between();
    }
}

/// One retention transaction: removes up to `RETAIN_CHUNK` of the oldest
/// events `policy` says to remove.
pub(crate) fn retain_chunk(
    shared: &Shared,
    policy: &Retention,
) -> Result<RetainReport, StorageError> {
    const BATCH: u64 = RETAIN_CHUNK;
    let mut report = RetainReport::default();
    let cutoff_ns = policy
        .max_age
        .map(|age| now_ns().saturating_sub(age.as_nanos().min(i64::MAX as u128) as i64));
    {
        let txn = super::txn::write(shared)?;
        let removed_now;
        let removed_ids;
        {
            let mut events = EventTables::write(&txn)?;
            let count = events.count()?;
            let over_count = policy.max_events.map_or(0, |m| count.saturating_sub(m));
            let mut over_bytes = match policy.max_bytes {
                Some(max) => {
                    let stats = txn.stats()?;
                    stats.stored_bytes().saturating_sub(max)
                }
                None => 0,
            };
            let mut to_remove = Vec::new();
            let mut rows = events.rows(0, u64::MAX, false)?;
            while let Some(row) = rows.next() {
                if to_remove.len() as u64 >= BATCH {
                    break;
                }
                let (seq, bytes) = row?;
                let by_count = (to_remove.len() as u64) < over_count;
                let by_age = match cutoff_ns {
                    Some(c) => codec::append_ns(bytes).map_err(|r| read::corrupted(seq, r))? < c,
                    None => false,
                };
                let by_bytes = over_bytes > 0;
                if !(by_count || by_age || by_bytes) {
                    break;
                }
                over_bytes = over_bytes.saturating_sub(bytes.len() as u64 + 24);
                let (_, rec) = codec::decode_ref(bytes).map_err(|r| read::corrupted(seq, r))?;
                to_remove.push((seq, rec.id));
            }
            drop(rows);
            removed_now = to_remove.len() as u64;
            let floor = to_remove.last().map(|&(seq, _)| seq);
            if let Some(&(last_removed, _)) = to_remove.last() {
                events.remove_through(last_removed)?;
                let mut meta = txn.open_table(META)?;
                let prev = match meta.get(META_RETAINED)? {
                    Some(v) => v.value().try_into().map_or(0, u64::from_be_bytes),
                    None => 0,
                };
                meta.insert(
                    META_RETAINED,
                    last_removed.max(prev).to_be_bytes().as_slice(),
                )?;
            }
            report.first_seq = events.bounds()?.map_or(0, |b| b.0);
            if let Some(floor) = floor {
                // Idle cursors now behind the oldest event skip to it and
                // count what they missed (running ones do so as they read).
                let active: Vec<String> = shared.durable.lock().keys().cloned().collect();
                let mut cursors = txn.open_table(CURSORS)?;
                let mut moved = Vec::new();
                for kv in cursors.iter()? {
                    let (k, v) = kv?;
                    let name = k.value().to_owned();
                    let rec: CursorRecord = from_bytes(v.value(), "cursors", &name)?;
                    if !active.contains(&name) && rec.delivered < floor {
                        moved.push((name, rec, floor));
                    }
                }
                for (name, mut rec, to) in moved {
                    rec.missed += to - rec.delivered;
                    rec.delivered = to;
                    cursors.insert(name.as_str(), to_bytes(&rec).as_slice())?;
                }
            }
            removed_ids = to_remove;
        }
        super::id_index::forget(&txn, &removed_ids)?;
        if removed_now == 0 {
            drop(txn);
            return Ok(report);
        }
        txn.commit()?;
        report.removed = removed_now;
    }
    Ok(report)
}

/// Compacts a closed log file; returns (bytes before, bytes after).
pub(crate) fn compact(path: &Path) -> Result<(u64, u64), OpenError> {
    super::open::check_file(path, false)?;
    super::open::check_existing(path)?;
    let before = std::fs::metadata(path)
        .map_err(|e| OpenError::Io(path.to_path_buf(), e))?
        .len();
    let mut db = redb::Builder::new()
        .open(path)
        .map_err(|e| super::open::map_open_error(path, e))?;
    {
        let txn = db.begin_read().map_err(|e| OpenError::Storage(e.into()))?;
        super::open::check_format(&txn, path)?;
    }
    db.compact().map_err(|e| OpenError::Storage(e.into()))?;
    drop(db);
    let after = std::fs::metadata(path)
        .map_err(|e| OpenError::Io(path.to_path_buf(), e))?
        .len();
    Ok((before, after))
}

/// The newest `limit` matching events, oldest first, read backwards from the
/// end of the log: `snap`'s records, then the file through `snap.applied`
/// (`txn` begun after the snapshot).
pub(crate) fn recent(
    txn: &redb::ReadTransaction,
    snap: &Snapshot,
    limit: usize,
    filter: &Filter,
) -> Result<Vec<Event>, ReadError> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    // Adds the record if it matches; true once `limit` are in.
    let keep = |out: &mut Vec<Event>, seq: u64, bytes: &[u8]| -> Result<bool, ReadError> {
        let (_, rec) = codec::decode_ref(bytes).map_err(|r| read::corrupted(seq, r))?;
        if filter.matches_parts(rec.event_type, rec.tenant_id, rec.instance()) {
            out.push(rec.to_event().map_err(|r| read::corrupted(seq, r))?);
        }
        Ok(out.len() == limit)
    };
    let mut full = false;
    for (seq, bytes) in snap.records_from(0).rev() {
        full = keep(&mut out, seq, bytes)?;
        if full {
            break;
        }
    }
    if !full {
        let events = EventTables::read(txn)?;
        let mut rows = events.rows(0, snap.applied, true)?;
        while let Some(row) = rows.next() {
            let (seq, bytes) = row?;
            if keep(&mut out, seq, bytes)? {
                break;
            }
        }
    }
    out.reverse();
    Ok(out)
}
