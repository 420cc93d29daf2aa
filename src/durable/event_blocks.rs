//! The events in the redb file: blocks of consecutive records, one redb
//! row per block.
//!
//! A redb insert costs the same for a 300-byte record as for a 30 KiB one,
//! and it was most of the applier's work with one row per event. So the
//! applier writes the records of an apply as *blocks* of consecutive
//! records, each up to [`BLOCK_BYTES`] (a larger record is a block of its
//! own), keyed by the `seq` of their first record.
//!
//! A block's bytes: `count: u32 LE`, then `count` end offsets (`u32 LE`,
//! each the end of one record, from the start of the records), then the
//! records (see `codec`) back to back.
//!
//! Files written before blocks (format 2 and older) hold one row per event
//! in `events`; those rows stay where they are and are read as blocks of
//! one. Every `seq` in `events` is below every `seq` in `event_blocks`:
//! after the upgrade, every append goes to blocks.
//!
//! Invariants (checked by `check`):
//! - the `seq`s of the two tables together are contiguous, from the oldest
//!   retained to the newest, each held once (retention removes a prefix,
//!   rewriting the block it cuts through under its first kept `seq`);
//! - a block holds at least one record.
//!
//! Everything that reads or writes events goes through [`EventTables`] and
//! [`Rows`], so no other module knows the layout.

use redb::{AccessGuard, Range, ReadableTable, TableDefinition};

use super::codec;
use crate::error::StorageError;

/// `seq` → record: one row per event (format 2 and older; read, never
/// written).
pub(crate) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// `seq` of its first record → a block of consecutive records.
pub(crate) const EVENT_BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("event_blocks");

/// A block takes at most this many bytes, header included, unless it is
/// one record that alone takes more. Just under 32 KiB, so that a block and
/// its redb leaf header fit a 32 KiB page: at exactly 32 KiB of records,
/// every block took a 64 KiB page and the file grew 1.7× (73 MB instead of
/// 42 MB for 100k events; 37.5 MB with this bound). Against 16 and 8 KiB,
/// the least CPU per event (BENCHMARKS.md, "Twelfth session").
pub(crate) const BLOCK_BYTES: usize = (32 << 10) - 64;

type Row<'a> = AccessGuard<'a, &'static [u8]>;
type Rng<'a> = Range<'a, u64, &'static [u8]>;

fn damaged(seq: u64, reason: impl Into<String>) -> StorageError {
    StorageError::Corrupted {
        table: "event_blocks",
        key: format!("seq {seq}"),
        reason: reason.into(),
    }
}

/// Why [`Rows::next`] gave no record.
#[derive(Debug)]
pub(crate) enum RowError {
    /// The block holding `seq` is damaged: its layout can't be read. The
    /// walk goes on after it.
    Damaged { seq: u64, reason: String },
    /// redb failed.
    Storage(StorageError),
}

impl From<RowError> for StorageError {
    fn from(e: RowError) -> StorageError {
        match e {
            RowError::Damaged { seq, reason } => damaged(seq, format!("damaged block: {reason}")),
            RowError::Storage(e) => e,
        }
    }
}

impl From<RowError> for crate::error::ReadError {
    fn from(e: RowError) -> crate::error::ReadError {
        crate::error::ReadError::Storage(e.into())
    }
}

/// Appends the block of `records` to `out`.
fn encode_into(records: &[&[u8]], out: &mut Vec<u8>) {
    let data: usize = records.iter().map(|r| r.len()).sum();
    out.reserve(4 + 4 * records.len() + data);
    // Groups and batches are capped far below 4 GiB (`MAX_BATCH_BYTES`).
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    let mut end = 0usize;
    for r in records {
        end += r.len();
        out.extend_from_slice(&(end as u32).to_le_bytes());
    }
    for r in records {
        out.extend_from_slice(r);
    }
}

/// The block of `records`, as stored.
pub(crate) fn encode(records: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(records, &mut out);
    out
}

/// A block's layout, checked once when its row is read.
#[derive(Clone, Copy, Debug)]
struct Layout {
    count: usize,
    /// Where the records start.
    data: usize,
}

impl Layout {
    fn of(bytes: &[u8]) -> Result<Layout, String> {
        let word = |i: usize| -> Option<usize> {
            let b = bytes.get(i..i + 4)?;
            Some(u32::from_le_bytes(b.try_into().ok()?) as usize)
        };
        let count = word(0).ok_or("shorter than its header")?;
        if count == 0 {
            return Err("a block without records".into());
        }
        let data = count
            .checked_mul(4)
            .and_then(|n| n.checked_add(4))
            .filter(|&d| d <= bytes.len())
            .ok_or("shorter than its header")?;
        let mut prev = 0;
        for i in 0..count {
            let end = word(4 + 4 * i).ok_or("shorter than its header")?;
            if end < prev {
                return Err(format!("record {i} ends before the one before it"));
            }
            prev = end;
        }
        if data + prev != bytes.len() {
            return Err(format!(
                "its records take {} bytes, not the {} after its header",
                prev,
                bytes.len() - data
            ));
        }
        Ok(Layout { count, data })
    }

    /// Record `i` (`i < count`) of `bytes`.
    fn record(self, bytes: &[u8], i: usize) -> &[u8] {
        let end_at = |j: usize| {
            let b: [u8; 4] = bytes[4 + 4 * j..8 + 4 * j].try_into().unwrap_or_default();
            u32::from_le_bytes(b) as usize
        };
        let start = if i == 0 { 0 } else { end_at(i - 1) };
        &bytes[self.data + start..self.data + end_at(i)]
    }
}

/// The records of a block, or why its layout is refused.
#[cfg(feature = "fuzzing")]
pub(crate) fn records(bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let layout = Layout::of(bytes)?;
    Ok((0..layout.count).map(|i| layout.record(bytes, i)).collect())
}

/// One stored record and the row that holds it.
pub(crate) struct Record<'a> {
    row: Row<'a>,
    /// `None`: the row is the record (a row of `events`).
    at: Option<(Layout, usize)>,
}

impl Record<'_> {
    /// The record's bytes (see `codec`).
    pub(crate) fn bytes(&self) -> &[u8] {
        match self.at {
            None => self.row.value(),
            Some((layout, i)) => layout.record(self.row.value(), i),
        }
    }
}

/// The event tables of one transaction: `events` (older files) and
/// `event_blocks`; `None` for one the file does not have.
pub(crate) struct EventTables<T> {
    legacy: Option<T>,
    blocks: Option<T>,
}

fn opened<T>(r: Result<T, redb::TableError>) -> Result<Option<T>, StorageError> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl EventTables<redb::ReadOnlyTable<u64, &'static [u8]>> {
    /// The event tables of a read transaction.
    pub(crate) fn read(txn: &redb::ReadTransaction) -> Result<Self, StorageError> {
        Ok(EventTables {
            legacy: opened(txn.open_table(EVENTS))?,
            blocks: opened(txn.open_table(EVENT_BLOCKS))?,
        })
    }

    /// [`EventTables::rows`], not borrowing the tables (for a reader that
    /// outlives them; the rows keep the transaction alive).
    pub(crate) fn rows_owned(&self, from: u64, to: u64) -> Result<Rows<'static>, StorageError> {
        // redb's own `ReadOnlyTable::range`: its range is `'static`.
        self.walk(from, to, false, |t, r| t.range(r))
    }
}

impl<T: ReadableTable<u64, &'static [u8]>> EventTables<T> {
    /// The key of the block that would hold `seq`: the greatest at or
    /// below it (or `seq` when there is none).
    fn block_start(&self, seq: u64) -> Result<u64, StorageError> {
        Ok(match &self.blocks {
            Some(t) => t
                .range(..=seq)?
                .next_back()
                .transpose()?
                .map_or(seq, |(k, _)| k.value()),
            None => seq,
        })
    }

    /// Oldest and newest `seq` stored, or `None` for an empty log.
    ///
    /// # Errors
    /// A redb error, or [`StorageError::Corrupted`] for a damaged newest
    /// block.
    pub(crate) fn bounds(&self) -> Result<Option<(u64, u64)>, StorageError> {
        let legacy = match &self.legacy {
            Some(t) => t
                .first()?
                .map(|(k, _)| k.value())
                .zip(t.last()?.map(|(k, _)| k.value())),
            None => None,
        };
        let blocks = match &self.blocks {
            Some(t) => match (t.first()?, t.last()?) {
                (Some((f, _)), Some((k, v))) => {
                    let layout = Layout::of(v.value()).map_err(|r| damaged(k.value(), r))?;
                    Some((f.value(), k.value() + layout.count as u64 - 1))
                }
                _ => None,
            },
            None => None,
        };
        Ok(match (legacy, blocks) {
            (Some((f, _)), Some((_, l))) => Some((f, l)),
            (a, b) => a.or(b),
        })
    }

    /// Events stored (the `seq`s are contiguous).
    ///
    /// # Errors
    /// As [`EventTables::bounds`].
    pub(crate) fn count(&self) -> Result<u64, StorageError> {
        Ok(self.bounds()?.map_or(0, |(f, l)| l - f + 1))
    }

    /// The record of `seq`, if stored.
    ///
    /// # Errors
    /// A redb error, or [`StorageError::Corrupted`] for a damaged block.
    pub(crate) fn get(&self, seq: u64) -> Result<Option<Record<'_>>, StorageError> {
        if let Some(t) = &self.legacy
            && let Some(row) = t.get(seq)?
        {
            return Ok(Some(Record { row, at: None }));
        }
        let Some(t) = &self.blocks else {
            return Ok(None);
        };
        let Some((k, row)) = t.range(..=seq)?.next_back().transpose()? else {
            return Ok(None);
        };
        let first = k.value();
        let layout = Layout::of(row.value()).map_err(|r| damaged(first, r))?;
        let i = (seq - first) as usize;
        Ok((i < layout.count).then_some(Record {
            row,
            at: Some((layout, i)),
        }))
    }

    /// The records from `from` through `to`, in `seq` order, or newest
    /// first with `rev`.
    ///
    /// # Errors
    /// A redb error.
    pub(crate) fn rows(&self, from: u64, to: u64, rev: bool) -> Result<Rows<'_>, StorageError> {
        self.walk(from, to, rev, |t, r| ReadableTable::range(t, r))
    }

    /// A walk over `from..=to`, with `range` opening each table's part.
    fn walk<'s, 'a>(
        &'s self,
        from: u64,
        to: u64,
        rev: bool,
        range: impl Fn(&'s T, std::ops::RangeInclusive<u64>) -> Result<Rng<'a>, redb::StorageError>,
    ) -> Result<Rows<'a>, StorageError> {
        let start = self.block_start(from)?;
        Ok(Rows::new(
            match &self.legacy {
                Some(t) if from <= to => Some(range(t, from..=to)?),
                _ => None,
            },
            match &self.blocks {
                Some(t) if start <= to => Some(range(t, start..=to)?),
                _ => None,
            },
            from,
            to,
            rev,
        ))
    }
}

/// What a stored row holds.
enum Kind {
    /// A row of `events`: one record.
    Row,
    Block(Layout),
    /// A block whose layout is damaged, for the `seq`s up to the next row.
    Damaged(String),
}

/// The row a [`Rows`] is in.
struct Current<'a> {
    row: Row<'a>,
    first: u64,
    kind: Kind,
    /// Its `seq`s: `first..first + count`.
    count: u64,
    /// Records passed, in the walk's order.
    passed: u64,
}

/// A row as the range gave it.
struct RawRow<'a> {
    is_block: bool,
    first: u64,
    row: Row<'a>,
}

/// A walk over stored records, one at a time ([`Rows::next`]): not an
/// `Iterator`, since each record borrows the walk's current row.
///
/// A block whose layout is damaged gives one error for each of its `seq`s
/// (those up to the next row's), so a reader can tell them from events
/// removed by retention.
pub(crate) struct Rows<'a> {
    legacy: Option<Rng<'a>>,
    blocks: Option<Rng<'a>>,
    from: u64,
    to: u64,
    rev: bool,
    cur: Option<Current<'a>>,
    /// The next row, read ahead to bound a damaged block.
    ahead: Option<RawRow<'a>>,
    /// The first `seq` of the row walked before (walking backwards: the
    /// bound of a damaged block).
    before: Option<u64>,
}

impl<'a> Rows<'a> {
    fn new(
        legacy: Option<Rng<'a>>,
        blocks: Option<Rng<'a>>,
        from: u64,
        to: u64,
        rev: bool,
    ) -> Self {
        Rows {
            legacy,
            blocks,
            from,
            to,
            rev,
            cur: None,
            ahead: None,
            before: None,
        }
    }

    /// The next row in the walk's order: `events`' rows come before every
    /// block.
    fn raw_row(&mut self) -> Option<Result<RawRow<'a>, StorageError>> {
        if let Some(r) = self.ahead.take() {
            return Some(Ok(r));
        }
        let order = if self.rev {
            [true, false]
        } else {
            [false, true]
        };
        for is_block in order {
            let slot = if is_block {
                &mut self.blocks
            } else {
                &mut self.legacy
            };
            let Some(range) = slot else { continue };
            let item = if self.rev {
                range.next_back()
            } else {
                range.next()
            };
            return Some(match item {
                None => {
                    *slot = None;
                    continue;
                }
                Some(Err(e)) => Err(e.into()),
                Some(Ok((k, row))) => Ok(RawRow {
                    is_block,
                    first: k.value(),
                    row,
                }),
            });
        }
        None
    }

    fn next_row(&mut self) -> Option<Result<Current<'a>, RowError>> {
        let raw = match self.raw_row()? {
            Ok(raw) => raw,
            Err(e) => return Some(Err(RowError::Storage(e))),
        };
        let before = self.before.replace(raw.first);
        let (kind, count) = if raw.is_block {
            match Layout::of(raw.row.value()) {
                Ok(layout) => (Kind::Block(layout), layout.count as u64),
                Err(reason) => {
                    // Its `seq`s end where the next one (in `seq` order)
                    // starts.
                    let end = if self.rev {
                        before
                    } else {
                        match self.raw_row() {
                            Some(Ok(next)) => {
                                let f = next.first;
                                self.ahead = Some(next);
                                Some(f)
                            }
                            Some(Err(e)) => return Some(Err(RowError::Storage(e))),
                            None => None,
                        }
                    };
                    let count = end.map_or(1, |e| e.saturating_sub(raw.first).max(1));
                    (Kind::Damaged(reason), count)
                }
            }
        } else {
            (Kind::Row, 1)
        };
        Some(Ok(Current {
            row: raw.row,
            first: raw.first,
            kind,
            count,
            passed: 0,
        }))
    }

    /// The next record in the range: its `seq` and bytes. An error is a
    /// storage failure, or a damaged block (one for each of its `seq`s);
    /// the walk goes on after it (for `check`).
    pub(crate) fn next(&mut self) -> Option<Result<(u64, &[u8]), RowError>> {
        loop {
            if let Some(c) = &mut self.cur {
                let mut hit = None;
                while c.passed < c.count {
                    let i = if self.rev {
                        c.count - 1 - c.passed
                    } else {
                        c.passed
                    };
                    c.passed += 1;
                    let seq = c.first + i;
                    if (self.from..=self.to).contains(&seq) {
                        hit = Some((seq, i as usize));
                        break;
                    }
                }
                if let Some((seq, i)) = hit {
                    let c = self.cur.as_ref()?;
                    let bytes = match &c.kind {
                        Kind::Row => c.row.value(),
                        Kind::Block(layout) => layout.record(c.row.value(), i),
                        Kind::Damaged(reason) => {
                            return Some(Err(RowError::Damaged {
                                seq,
                                reason: reason.clone(),
                            }));
                        }
                    };
                    return Some(Ok((seq, bytes)));
                }
            }
            self.cur = None;
            match self.next_row()? {
                Ok(c) => self.cur = Some(c),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl<'t> EventTables<redb::Table<'t, u64, &'static [u8]>> {
    /// The event tables of a write transaction (both exist once it commits).
    ///
    /// # Errors
    /// A redb error.
    pub(crate) fn write(txn: &'t redb::WriteTransaction) -> Result<Self, StorageError> {
        Ok(EventTables {
            legacy: Some(txn.open_table(EVENTS)?),
            blocks: Some(txn.open_table(EVENT_BLOCKS)?),
        })
    }

    fn blocks_mut(&mut self) -> Result<&mut redb::Table<'t, u64, &'static [u8]>, StorageError> {
        self.blocks
            .as_mut()
            .ok_or_else(|| damaged(0, "no event_blocks table"))
    }

    /// Stores `records` (`seq`, record; in `seq` order, after every stored
    /// `seq`) as blocks of at most [`BLOCK_BYTES`] each. A `seq` that does
    /// not follow the one before starts a new block, so a block's records
    /// are always consecutive.
    ///
    /// # Errors
    /// A redb error.
    pub(crate) fn append<'r>(
        &mut self,
        records: impl IntoIterator<Item = (u64, &'r [u8])>,
    ) -> Result<(), StorageError> {
        let mut block: Vec<&[u8]> = Vec::new();
        let mut buf = Vec::new();
        let (mut start, mut bytes) = (0u64, 0usize);
        for (seq, r) in records {
            // The block's size with `r`: count, offsets, records.
            let full = 4 + 4 * (block.len() + 1) + bytes + r.len() > BLOCK_BYTES;
            let next = start + block.len() as u64;
            if !block.is_empty() && (full || seq != next) {
                self.put(start, &block, &mut buf)?;
                block.clear();
            }
            if block.is_empty() {
                (start, bytes) = (seq, 0);
            }
            block.push(r);
            bytes += r.len();
        }
        if !block.is_empty() {
            self.put(start, &block, &mut buf)?;
        }
        Ok(())
    }

    fn put(&mut self, start: u64, block: &[&[u8]], buf: &mut Vec<u8>) -> Result<(), StorageError> {
        buf.clear();
        encode_into(block, buf);
        self.blocks_mut()?.insert(start, buf.as_slice())?;
        Ok(())
    }

    /// Removes every record through `last` (a prefix of the log). The block
    /// `last` falls inside is stored again from `last + 1`.
    ///
    /// # Errors
    /// A redb error, or [`StorageError::Corrupted`] for a damaged block.
    pub(crate) fn remove_through(&mut self, last: u64) -> Result<(), StorageError> {
        if let Some(t) = &mut self.legacy {
            t.retain_in(..=last, |_, _| false)?;
        }
        let t = self.blocks_mut()?;
        let mut whole = Vec::new();
        let mut cut: Option<(u64, Vec<u8>)> = None;
        for kv in t.range(..=last)? {
            let (k, row) = kv?;
            let first = k.value();
            let layout = Layout::of(row.value()).map_err(|r| damaged(first, r))?;
            if first + layout.count as u64 - 1 <= last {
                whole.push(first);
            } else {
                let bytes = row.value();
                let kept: Vec<&[u8]> = ((last + 1 - first) as usize..layout.count)
                    .map(|i| layout.record(bytes, i))
                    .collect();
                cut = Some((first, encode(&kept)));
            }
        }
        for k in whole {
            t.remove(k)?;
        }
        if let Some((first, kept)) = cut {
            t.remove(first)?;
            t.insert(last + 1, kept.as_slice())?;
        }
        Ok(())
    }
}

/// The newest append time in the log, or `i64::MIN` for an empty log.
///
/// # Errors
/// A redb error, or [`StorageError::Corrupted`] for a damaged record.
pub(crate) fn last_append_ns<T: ReadableTable<u64, &'static [u8]>>(
    events: &EventTables<T>,
) -> Result<i64, StorageError> {
    let Some((_, last)) = events.bounds()? else {
        return Ok(i64::MIN);
    };
    match events.get(last)? {
        Some(r) => codec::append_ns(r.bytes()).map_err(|r| super::read::corrupted(last, r)),
        None => Ok(i64::MIN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableDatabase;

    fn db() -> redb::Database {
        redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap()
    }

    /// Record `seq`: its `seq` in 8 bytes, then `len - 8` bytes.
    fn rec(seq: u64, len: usize) -> Vec<u8> {
        let mut r = seq.to_le_bytes().to_vec();
        r.resize(len.max(8), seq as u8);
        r
    }

    /// `events` rows for 1..=legacy, then blocks appended in `applies`.
    fn log(legacy: u64, applies: &[Vec<usize>]) -> (redb::Database, Vec<Vec<u8>>) {
        let db = db();
        let mut all = Vec::new();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(EVENTS).unwrap();
            for seq in 1..=legacy {
                all.push(rec(seq, 20));
                t.insert(seq, all.last().unwrap().as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
        for sizes in applies {
            let first = all.len() as u64 + 1;
            let recs: Vec<Vec<u8>> = (first..).zip(sizes).map(|(s, &n)| rec(s, n)).collect();
            let txn = db.begin_write().unwrap();
            EventTables::write(&txn)
                .unwrap()
                .append((first..).zip(recs.iter().map(Vec::as_slice)))
                .unwrap();
            txn.commit().unwrap();
            all.extend(recs);
        }
        (db, all)
    }

    fn walk<T: ReadableTable<u64, &'static [u8]>>(
        t: &EventTables<T>,
        from: u64,
        to: u64,
        rev: bool,
    ) -> Vec<(u64, Vec<u8>)> {
        let mut rows = t.rows(from, to, rev).unwrap();
        let mut out = Vec::new();
        while let Some(r) = rows.next() {
            let (seq, b) = r.unwrap();
            out.push((seq, b.to_vec()));
        }
        out
    }

    /// Every range, both ways, every `get`, and the bounds, against `model`
    /// (`seq` → record, from `first`).
    fn matches_model(db: &redb::Database, first: u64, model: &[Vec<u8>]) {
        let txn = db.begin_read().unwrap();
        let t = EventTables::read(&txn).unwrap();
        let last = first + model.len() as u64 - 1;
        assert_eq!(t.bounds().unwrap(), Some((first, last)));
        assert_eq!(t.count().unwrap(), model.len() as u64);
        let at = |s: u64| (s, model[(s - first) as usize].clone());
        for from in first.saturating_sub(1)..=last + 1 {
            assert_eq!(
                t.get(from).unwrap().map(|r| r.bytes().to_vec()),
                (first..=last).contains(&from).then(|| at(from).1),
                "get {from}"
            );
            for to in from..=last + 1 {
                let want: Vec<_> = (from.max(first)..=to.min(last)).map(at).collect();
                assert_eq!(walk(&t, from, to, false), want, "{from}..={to}");
                let back: Vec<_> = want.into_iter().rev().collect();
                assert_eq!(walk(&t, from, to, true), back, "{from}..={to} backwards");
            }
        }
        let whole = t.rows_owned(0, u64::MAX).unwrap();
        drop(t);
        let mut whole = whole;
        let mut n = 0;
        while let Some(r) = whole.next() {
            assert_eq!(r.unwrap().1, model[n].as_slice());
            n += 1;
        }
        assert_eq!(n, model.len(), "rows outliving their tables");
    }

    #[test]
    fn records_split_into_blocks_at_the_byte_limit_and_not_before() {
        // Two records of `half` make a block of exactly the limit (count,
        // two offsets, records): one block. One byte more: two. A record
        // over the limit: a block of its own.
        let half = (BLOCK_BYTES - 12) / 2;
        assert_eq!(encode(&[&rec(1, half), &rec(2, half)]).len(), BLOCK_BYTES);
        let (db, _) = log(
            0,
            &[
                vec![half, half],
                vec![half, half + 1],
                vec![10, BLOCK_BYTES + 5, 10],
            ],
        );
        let txn = db.begin_read().unwrap();
        let keys: Vec<u64> = txn
            .open_table(EVENT_BLOCKS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|r| r.unwrap().0.value())
            .collect();
        assert_eq!(keys, vec![1, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn a_seq_that_does_not_follow_starts_a_new_block() {
        let db = db();
        let recs: Vec<(u64, Vec<u8>)> = [1u64, 2, 3, 7, 8, 20]
            .iter()
            .map(|&s| (s, rec(s, 50)))
            .collect();
        let txn = db.begin_write().unwrap();
        EventTables::write(&txn)
            .unwrap()
            .append(recs.iter().map(|(s, r)| (*s, r.as_slice())))
            .unwrap();
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        let t = EventTables::read(&txn).unwrap();
        let keys: Vec<u64> = txn
            .open_table(EVENT_BLOCKS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|r| r.unwrap().0.value())
            .collect();
        assert_eq!(keys, vec![1, 7, 20]);
        for (seq, r) in &recs {
            assert_eq!(
                t.get(*seq).unwrap().map(|g| g.bytes().to_vec()).as_ref(),
                Some(r)
            );
        }
        assert!(t.get(4).unwrap().is_none() && t.get(9).unwrap().is_none());
    }

    #[test]
    fn ranges_gets_and_bounds_cross_rows_and_blocks() {
        let applies = vec![vec![100; 3], vec![9000; 9], vec![40], vec![500; 5]];
        for legacy in [0u64, 1, 4] {
            let (db, model) = log(legacy, &applies);
            matches_model(&db, 1, &model);
        }
    }

    #[test]
    fn removing_a_prefix_cuts_through_rows_and_blocks() {
        let applies = vec![vec![9000; 9], vec![100; 3], vec![40]];
        for legacy in [0u64, 3] {
            let (_, model) = log(legacy, &applies);
            for cut in 0..model.len() as u64 - 1 {
                let (db, _) = log(legacy, &applies);
                let txn = db.begin_write().unwrap();
                EventTables::write(&txn)
                    .unwrap()
                    .remove_through(cut)
                    .unwrap();
                txn.commit().unwrap();
                matches_model(&db, cut + 1, &model[cut as usize..]);
            }
        }
    }

    #[test]
    fn a_block_gives_back_its_records_and_refuses_damage() {
        let recs: Vec<Vec<u8>> = vec![b"a".to_vec(), Vec::new(), b"ccc".to_vec()];
        let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
        let b = encode(&refs);
        let l = Layout::of(&b).unwrap();
        assert_eq!(l.count, 3);
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(l.record(&b, i), r.as_slice());
        }
        assert!(Layout::of(&b[..b.len() - 1]).is_err(), "truncated records");
        assert!(Layout::of(&b[..3]).is_err(), "truncated count");
        assert!(Layout::of(&b[..8]).is_err(), "truncated offsets");
        assert!(Layout::of(&0u32.to_le_bytes()).is_err(), "no records");
        let mut long = b.clone();
        long.push(0);
        assert!(Layout::of(&long).is_err(), "trailing bytes");
        let mut swapped = b.clone();
        swapped[4..8].copy_from_slice(&9u32.to_le_bytes());
        assert!(Layout::of(&swapped).is_err(), "offsets going backwards");
        let mut huge = b.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Layout::of(&huge).is_err(), "a count past the bytes");
    }
}
