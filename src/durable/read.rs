//! Reading the log: positions, streaming readers, seek by time, and the
//! read-only handle another process uses while the owner writes.
//!
//! Seeking to a time does not need a time index: `seq` keys are contiguous
//! and append times never decrease along `seq` (see `tables`), so the first
//! event at or after a time is found by binary search over `seq`, reading the
//! 8-byte header of about log2(n) records.

use std::io::Write;
use std::path::Path;

use jiff::Timestamp;
use redb::{ReadableDatabase, ReadableTable};

use super::codec::{self, RecordRef};
use super::event_blocks::{EventTables, Rows};
use super::read_tail::Snapshot;
use super::tables::{META, META_RETAINED, id_key};
use crate::error::{OpenError, ReadError, StorageError};
use crate::event::Event;
use crate::filter::Filter;
use crate::id::EventId;

/// A place in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The oldest retained event.
    Beginning,
    /// After the newest event: only events appended from now on.
    End,
    /// The event with this `seq` (or the oldest retained one, if it was
    /// removed by retention).
    Seq(u64),
    /// The first event whose append time is at or after this time.
    Time(Timestamp),
    /// The event with this id.
    Id(EventId),
}

/// One event read from the log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    /// Its sequence number.
    pub seq: u64,
    /// When it was appended (never decreases along `seq`).
    pub appended_at: Timestamp,
    /// The event, exactly as published.
    pub event: Event,
}

impl LogEntry {
    /// The event's JSON envelope with `"seq"` in front: the line format of
    /// `ctrlbus replay`.
    pub fn to_json(&self) -> String {
        let body = self.event.to_json();
        // body starts with '{'; an Event always has at least one field.
        format!("{{\"seq\":{},{}", self.seq, &body[1..])
    }
}

fn storage(e: impl Into<redb::Error>) -> ReadError {
    ReadError::Storage(StorageError::Redb(e.into()))
}

pub(crate) fn corrupted(seq: u64, reason: String) -> StorageError {
    StorageError::Corrupted {
        table: "events",
        key: format!("seq {seq}"),
        reason,
    }
}

/// The largest `seq` ever assigned (present or removed by retention).
pub(crate) fn last_assigned(txn: &redb::ReadTransaction) -> Result<u64, StorageError> {
    let last = EventTables::read(txn)?.bounds()?.map_or(0, |(_, l)| l);
    Ok(last.max(retained_through(txn)?))
}

pub(crate) fn retained_through(txn: &redb::ReadTransaction) -> Result<u64, StorageError> {
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    Ok(match meta.get(META_RETAINED)? {
        Some(v) => {
            let b: [u8; 8] = v.value().try_into().map_err(|_| StorageError::Corrupted {
                table: "ctrlbus_meta",
                key: META_RETAINED.into(),
                reason: "not 8 bytes".into(),
            })?;
            u64::from_be_bytes(b)
        }
        None => 0,
    })
}

/// The first `seq` at or after `position` (which may be one past the last).
pub(crate) fn resolve(txn: &redb::ReadTransaction, position: Position) -> Result<u64, ReadError> {
    resolve_in(txn, &Snapshot::file_only(), position)
}

/// [`resolve`] over the file through `snap.applied` and the records of
/// `snap` after it.
pub(crate) fn resolve_in(
    txn: &redb::ReadTransaction,
    snap: &Snapshot,
    position: Position,
) -> Result<u64, ReadError> {
    let events = EventTables::read(txn).map_err(ReadError::Storage)?;
    let bounds = events.bounds().map_err(ReadError::Storage)?;
    // As `last_assigned`, from the bounds just read.
    let last = bounds
        .map_or(0, |b| b.1)
        .max(retained_through(txn)?)
        .max(snap.last().unwrap_or(0));
    // The file's part: through `applied` only (a commit after the
    // snapshot may hold more).
    let in_file = bounds
        .map(|(first, newest)| (first, newest.min(snap.applied)))
        .filter(|(first, newest)| first <= newest);
    let Some(first) = in_file.map(|b| b.0).or(snap.first()) else {
        return match position {
            Position::Id(id) => Err(ReadError::UnknownEvent(id)),
            _ => Ok(last + 1),
        };
    };
    let in_memory = |r: Result<Option<u64>, (u64, String)>| {
        r.map_err(|(seq, reason)| ReadError::Storage(corrupted(seq, reason)))
    };
    Ok(match position {
        Position::Beginning => first,
        Position::End => last + 1,
        Position::Seq(s) => s.max(first),
        Position::Id(id) => {
            let key = id_key(id.to_bytes());
            let found = super::id_index::find_in(txn, key).map_err(ReadError::Storage)?;
            match found {
                Some(seq) => seq,
                None => in_memory(snap.find_id(key))?.ok_or(ReadError::UnknownEvent(id))?,
            }
        }
        Position::Time(t) => {
            let target = t.as_nanosecond();
            let in_file = match in_file {
                Some((first, newest)) => {
                    Some(seek_time(&events, first, newest, target)?).filter(|&s| s <= newest)
                }
                None => None,
            };
            match in_file {
                Some(seq) => seq,
                None => in_memory(snap.seek_time(clamp_ns(target)))?.unwrap_or(last + 1),
            }
        }
    })
}

/// Nanoseconds as the records store them.
fn clamp_ns(t: i128) -> i64 {
    t.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// The first `seq` in `[lo, hi]` whose append time is `>= target`, or
/// `hi + 1`. Binary search: append times never decrease along `seq`.
fn seek_time<T: ReadableTable<u64, &'static [u8]>>(
    events: &EventTables<T>,
    lo: u64,
    hi: u64,
    target: i128,
) -> Result<u64, ReadError> {
    let target = clamp_ns(target);
    let (mut lo, mut hi) = (lo, hi + 1); // answer in [lo, hi]
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let t = match events.get(mid).map_err(ReadError::Storage)? {
            Some(r) => {
                codec::append_ns(r.bytes()).map_err(|r| ReadError::Storage(corrupted(mid, r)))?
            }
            // Keys are contiguous; a hole means the file is damaged.
            None => {
                return Err(ReadError::Storage(corrupted(
                    mid,
                    "missing from a contiguous range".into(),
                )));
            }
        };
        if t < target {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// A streaming reader over the log, in `seq` order. Memory stays constant
/// whatever the log's size: it holds one read transaction and one block of
/// records at a time. It sees the log as it was when created.
pub struct LogReader {
    rows: Rows<'static>,
    /// The records after the file's part (see `read_tail`), read from
    /// `seq` `tail_from` on; the next one to look at: (group, record).
    tail: Vec<super::read_tail::TailGroup>,
    tail_from: u64,
    tail_at: (usize, usize),
    state: ReadState,
}

/// What a [`LogReader`] keeps beside its rows (apart from them, since each
/// record it reads borrows them).
struct ReadState {
    filter: Filter,
    until_ns: Option<i64>,
    done: bool,
    /// The next `seq` this reader would return (for `tail --follow`).
    next_seq: u64,
}

/// What `LogReader` does with one record.
enum Step<'a> {
    Skip,
    End,
    Fail(ReadError),
    Take(i64, RecordRef<'a>),
}

impl LogReader {
    pub(crate) fn new<D: ReadableDatabase>(
        db: &D,
        from: Position,
        filter: &Filter,
    ) -> Result<LogReader, ReadError> {
        let txn = db.begin_read().map_err(storage)?;
        LogReader::in_snapshot(&txn, Snapshot::file_only(), from, filter)
    }

    /// A reader of the file through `snap.applied` (in `txn`, begun after
    /// the snapshot was taken), then of `snap`'s records.
    pub(crate) fn in_snapshot(
        txn: &redb::ReadTransaction,
        snap: Snapshot,
        from: Position,
        filter: &Filter,
    ) -> Result<LogReader, ReadError> {
        let start = resolve_in(txn, &snap, from)?;
        let rows = EventTables::read(txn)
            .and_then(|events| events.rows_owned(start, snap.applied))
            .map_err(ReadError::Storage)?;
        Ok(LogReader {
            rows,
            tail_from: start.max(snap.applied.saturating_add(1)),
            tail: snap.groups,
            tail_at: (0, 0),
            state: ReadState {
                filter: filter.clone(),
                until_ns: None,
                done: false,
                next_seq: start,
            },
        })
    }

    /// Stops before the first event appended after `t`.
    pub fn until(mut self, t: Timestamp) -> LogReader {
        self.state.until_ns = Some(crate::time::ns(t));
        self
    }

    /// The `seq` after the last record this reader has passed (matching or
    /// not): where a follow-up reader should start.
    pub fn next_seq(&self) -> u64 {
        self.state.next_seq
    }

    /// Advances to the next matching record and hands it, undecoded, to `f`
    /// (its `seq`, append time and fields; an `Err` is the reason the record
    /// is unsound). Any error, storage or record, ends the reader and names
    /// the record's `seq`.
    fn next_raw<R>(
        &mut self,
        f: impl FnOnce(u64, i64, &RecordRef<'_>) -> Result<R, String>,
    ) -> Option<Result<R, ReadError>> {
        if self.state.done {
            return None;
        }
        loop {
            if let Some(row) = self.rows.next() {
                let (seq, bytes) = match row {
                    Ok(row) => row,
                    Err(e) => {
                        self.state.done = true;
                        return Some(Err(e.into()));
                    }
                };
                match self.state.step(seq, bytes) {
                    Step::Skip => {}
                    Step::End => return None,
                    Step::Fail(e) => return Some(Err(e)),
                    Step::Take(append, rec) => return Some(self.state.take(seq, append, &rec, f)),
                }
                continue;
            }
            // Then the records the file does not hold yet.
            let (gi, ri) = self.tail_at;
            let (first, records) = self.tail.get(gi).map(|g| (g.first, g.records.clone()))?;
            let Some(record) = records.get(ri) else {
                self.tail_at = (gi + 1, 0);
                continue;
            };
            self.tail_at = (gi, ri + 1);
            let seq = first + ri as u64;
            if seq < self.tail_from {
                continue; // in the file's part, or before the start
            }
            match self.state.step(seq, record) {
                Step::Skip => {}
                Step::End => return None,
                Step::Fail(e) => return Some(Err(e)),
                Step::Take(append, rec) => return Some(self.state.take(seq, append, &rec, f)),
            }
        }
    }

    /// Writes the next matching event as one JSON line (envelope plus
    /// `"seq"`) without building an [`Event`]: the payload bytes are copied
    /// as stored. Returns `None` at the end.
    ///
    /// # Errors
    /// [`ReadError::Storage`] for a storage failure or a corrupted record
    /// (the error names its `seq`).
    pub fn write_next_json(&mut self, out: &mut Vec<u8>) -> Option<Result<u64, ReadError>> {
        self.next_raw(|seq, _, rec| write_json_line(seq, rec, out).map(|()| seq))
    }
}

impl ReadState {
    /// Decodes one record and says whether the read takes it.
    fn step<'a>(&mut self, seq: u64, bytes: &'a [u8]) -> Step<'a> {
        let (append, rec) = match codec::decode_ref(bytes) {
            Ok(r) => r,
            Err(reason) => {
                self.done = true;
                return Step::Fail(ReadError::Storage(corrupted(seq, reason)));
            }
        };
        if self.until_ns.is_some_and(|u| append > u) {
            self.done = true;
            return Step::End;
        }
        self.next_seq = seq + 1;
        if self
            .filter
            .matches_parts(rec.event_type, rec.tenant_id, rec.instance())
        {
            Step::Take(append, rec)
        } else {
            Step::Skip
        }
    }

    fn take<R>(
        &mut self,
        seq: u64,
        append: i64,
        rec: &RecordRef<'_>,
        f: impl FnOnce(u64, i64, &RecordRef<'_>) -> Result<R, String>,
    ) -> Result<R, ReadError> {
        let r = f(seq, append, rec);
        if r.is_err() {
            self.done = true;
        }
        r.map_err(|reason| ReadError::Storage(corrupted(seq, reason)))
    }
}

impl Iterator for LogReader {
    type Item = Result<LogEntry, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_raw(|seq, append, rec| {
            rec.to_event().map(|event| LogEntry {
                seq,
                appended_at: crate::time::ts(append),
                event,
            })
        })
    }
}

/// Writes `{"seq":N,<envelope>}\n` straight from a stored record; the same
/// bytes as `LogEntry::to_json` plus a newline.
///
/// The fields are checked as `RecordRef::to_event` checks them, but for the
/// payload, whose stored bytes are copied without parsing (that parse is most
/// of the cost of decoding); `check` verifies payloads.
fn write_json_line(seq: u64, rec: &RecordRef<'_>, out: &mut Vec<u8>) -> Result<(), String> {
    crate::event::check(rec.event_type)
        .map_err(|reason| format!("event type {:?} {reason}", rec.event_type))?;
    let ts = Timestamp::new(rec.ts_secs, rec.ts_nanos).map_err(|e| e.to_string())?;
    let json_str =
        |out: &mut Vec<u8>, s: &str| serde_json::to_writer(&mut *out, s).map_err(|e| e.to_string());
    write!(
        out,
        "{{\"seq\":{seq},\"id\":\"{}\",\"type\":",
        EventId::from_bytes(rec.id)
    )
    .map_err(|e| e.to_string())?;
    json_str(out, rec.event_type)?;
    out.extend_from_slice(b",\"tenant_id\":");
    json_str(out, rec.tenant_id)?;
    if let Some(i) = rec.instance() {
        write!(out, ",\"instance_id\":\"{i}\"").map_err(|e| e.to_string())?;
    }
    if !rec.actor_id.is_empty() {
        out.extend_from_slice(b",\"actor_id\":");
        json_str(out, rec.actor_id)?;
    }
    if !rec.payload.0.is_empty() && rec.payload.0 != b"{}" {
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(rec.payload.0);
    }
    writeln!(out, ",\"timestamp\":\"{ts}\"}}").map_err(|e| e.to_string())?;
    Ok(())
}

/// A read-only view of a ctrlbus log, for another process (an operator's
/// `ctrlbus replay`) while the owner keeps writing. It sees each commit of
/// the owner as soon as it is made.
pub struct ReadOnlyLog {
    pub(crate) db: redb::ReadOnlyDatabase,
    /// The file (its WAL is beside it).
    path: std::path::PathBuf,
}

impl ReadOnlyLog {
    /// Opens a log read-only. Works while a [`DurableBus`](crate::DurableBus)
    /// in another process has it open (it uses redb's `SingleWriter` mode,
    /// ctrlbus's default).
    ///
    /// # Errors
    /// [`OpenError::NotFound`] for a missing file, [`OpenError::NotCtrlbus`]
    /// for a file that is not a ctrlbus log, [`OpenError::NewerFormat`],
    /// [`OpenError::NeedsRecovery`] when the last writer crashed and nobody
    /// has reopened it for writing since, [`OpenError::InUse`] when the writer
    /// excludes readers.
    pub fn open(path: impl AsRef<Path>) -> Result<ReadOnlyLog, OpenError> {
        let path = path.as_ref();
        super::open::check_file(path, false)?;
        let db = redb::Builder::new()
            .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
            .set_cache_size(super::READ_ONLY_CACHE_BYTES)
            .open_read_only(path)
            .map_err(|e| super::open::map_open_error(path, e))?;
        let txn = db.begin_read().map_err(|e| OpenError::Storage(e.into()))?;
        super::open::check_format(&txn, path)?;
        drop(txn);
        Ok(ReadOnlyLog {
            db,
            path: path.to_path_buf(),
        })
    }

    /// Acknowledged events that wait in the log's write-ahead log with no
    /// process to apply them: the last writer was killed and nobody has
    /// opened the log for writing since. This reader does not see them; a
    /// writable open ([`DurableBus::open`](crate::DurableBus::open)) recovers
    /// them. 0 while the owner runs (it applies them itself).
    ///
    /// # Errors
    /// [`StorageError`] when the file can't be read.
    pub fn unrecovered_events(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read()?;
        super::recovery::unrecovered(&txn, &self.path)
    }

    /// A streaming reader from `from`, yielding events matching `filter`.
    ///
    /// # Errors
    /// [`ReadError::UnknownEvent`] for a [`Position::Id`] not in the log,
    /// [`ReadError::Storage`] when storage fails.
    pub fn read(&self, from: Position, filter: &Filter) -> Result<LogReader, ReadError> {
        LogReader::new(&self.db, from, filter)
    }

    /// Counts and bounds of the log.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails.
    pub fn stats(&self) -> Result<super::Stats, StorageError> {
        let mut stats = super::upkeep::stats(&self.db, None)?;
        stats.apply_lag_events = self.unrecovered_events()?;
        Ok(stats)
    }

    /// Every durable subscription's cursor.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails or a cursor record is corrupted.
    pub fn cursors(&self) -> Result<Vec<super::CursorInfo>, StorageError> {
        super::subscription::list_cursors(&self.db, None)
    }

    /// One cursor.
    ///
    /// # Errors
    /// [`crate::CursorError::Unknown`] for an unknown name.
    pub fn cursor(&self, name: &str) -> Result<super::CursorInfo, crate::CursorError> {
        super::subscription::get_cursor(&self.db, None, name)
    }

    /// Verifies every record and index entry.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails (corruption is reported in the
    /// returned report, not as an error).
    pub fn check(&self) -> Result<super::CheckReport, StorageError> {
        let hooks = super::HookFactories::default().make();
        super::upkeep::check(&self.db, Some(&self.path), &hooks, &mut |_, _| {})
    }

    /// The dead letters of one subscription, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails.
    pub fn dead_letters(&self, name: &str) -> Result<Vec<super::DeadLetter>, StorageError> {
        super::subscription::dead_letters(&self.db, name)
    }

    /// The redb database, read-only (for the webhook registry's listings).
    pub(crate) fn database(&self) -> &redb::ReadOnlyDatabase {
        &self.db
    }
}
