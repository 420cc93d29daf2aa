//! Named cursors as stored and administered: their records, listing,
//! showing, seeking, deleting, and the dead letters.

use super::*;

/// The state of a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CursorState {
    /// Not running in this process (or read from another process).
    Idle,
    /// Running and receiving events inside `publish`.
    Live,
    /// Running and catching up from the log on its own thread.
    CatchUp,
}

/// A cursor, as `cursors list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CursorInfo {
    /// The subscription's name.
    pub name: String,
    /// Its filter.
    pub filter: Filter,
    /// Every event up to this `seq` has been handled.
    pub delivered_seq: u64,
    /// The next `seq` it will look at.
    pub next_seq: u64,
    /// Events appended after its position (of any type).
    pub lag: u64,
    /// Running state.
    pub state: CursorState,
    /// Events in its dead letters.
    pub dead_letters: u64,
    /// Events removed by retention before it reached them.
    pub missed: u64,
    /// When the cursor was created.
    pub created_at: Timestamp,
    /// When its stored position last changed.
    pub updated_at: Timestamp,
    /// The last handler error seen in this process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

pub(super) fn info(
    name: &str,
    rec: &CursorRecord,
    last_seq: u64,
    dead: u64,
    active: Option<&Arc<DurableSub>>,
) -> Result<CursorInfo, StorageError> {
    let filter: Filter =
        serde_json::from_str(&rec.filter_json).map_err(|e| StorageError::Corrupted {
            table: "cursors",
            key: name.to_owned(),
            reason: format!("filter: {e}"),
        })?;
    let (delivered, state, last_error) = match active {
        Some(s) => (
            s.delivered.load(Ordering::Acquire),
            if s.live.load(Ordering::Acquire) {
                CursorState::Live
            } else {
                CursorState::CatchUp
            },
            s.last_error.lock().clone(),
        ),
        None => (rec.delivered, CursorState::Idle, None),
    };
    Ok(CursorInfo {
        name: name.to_owned(),
        filter,
        delivered_seq: delivered,
        next_seq: delivered + 1,
        lag: last_seq.saturating_sub(delivered),
        state,
        dead_letters: dead,
        missed: active.map_or(rec.missed, |s| s.record.lock().missed),
        created_at: ts(rec.created_ns),
        updated_at: ts(rec.updated_ns),
        last_error,
    })
}

pub(super) fn count_dead(txn: &redb::ReadTransaction, name: &str) -> Result<u64, StorageError> {
    let dead = txn.open_table(DEAD_LETTERS)?;
    let mut n = 0;
    for kv in dead.range((name, 0u64)..=(name, u64::MAX))? {
        kv?;
        n += 1;
    }
    Ok(n)
}

pub(crate) fn list_cursors<D: ReadableDatabase>(
    db: &D,
    shared: Option<&Shared>,
) -> Result<Vec<CursorInfo>, StorageError> {
    let txn = db.begin_read()?;
    let last = read::last_assigned(&txn)?;
    let cursors = txn.open_table(CURSORS)?;
    let active = shared.map(|s| s.durable.lock().clone()).unwrap_or_default();
    let mut out = Vec::new();
    for kv in cursors.iter()? {
        let (k, v) = kv?;
        let name = k.value();
        let rec: CursorRecord = from_bytes(v.value(), "cursors", name)?;
        out.push(info(
            name,
            &rec,
            last,
            count_dead(&txn, name)?,
            active.get(name),
        )?);
    }
    Ok(out)
}

pub(crate) fn get_cursor<D: ReadableDatabase>(
    db: &D,
    shared: Option<&Shared>,
    name: &str,
) -> Result<CursorInfo, CursorError> {
    if !valid_name(name) {
        return Err(CursorError::InvalidName(name.to_owned()));
    }
    let txn = db.begin_read().map_err(StorageError::from)?;
    let last = read::last_assigned(&txn)?;
    let cursors = txn.open_table(CURSORS).map_err(StorageError::from)?;
    let rec: CursorRecord = match cursors.get(name).map_err(StorageError::from)? {
        Some(v) => from_bytes(v.value(), "cursors", name)?,
        None => return Err(CursorError::Unknown(name.to_owned())),
    };
    let active = shared.and_then(|s| s.durable.lock().get(name).cloned());
    Ok(info(
        name,
        &rec,
        last,
        count_dead(&txn, name)?,
        active.as_ref(),
    )?)
}

pub(crate) fn dead_letters<D: ReadableDatabase>(
    db: &D,
    name: &str,
) -> Result<Vec<DeadLetter>, StorageError> {
    let txn = db.begin_read()?;
    let dead = txn.open_table(DEAD_LETTERS)?;
    let mut out = Vec::new();
    for kv in dead.range((name, 0u64)..=(name, u64::MAX))? {
        let (k, v) = kv?;
        let (_, seq) = k.value();
        let rec: DeadLetterRecord = from_bytes(v.value(), "dead_letters", format!("{name}/{seq}"))?;
        out.push(DeadLetter {
            subscription: name.to_owned(),
            seq,
            error: rec.error,
            attempts: rec.attempts,
            at: ts(rec.at_ns),
        });
    }
    Ok(out)
}

/// An event a durable subscription gave up on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The subscription.
    pub subscription: String,
    /// The event's `seq`.
    pub seq: u64,
    /// The handler's last error.
    pub error: String,
    /// Deliveries made.
    pub attempts: u32,
    /// When it was dead-lettered (or last re-driven).
    pub at: Timestamp,
}

pub(super) fn check_inactive(shared: &Shared, name: &str) -> Result<(), CursorError> {
    if !valid_name(name) {
        return Err(CursorError::InvalidName(name.to_owned()));
    }
    if shared.durable.lock().contains_key(name) {
        return Err(CursorError::Active(name.to_owned()));
    }
    Ok(())
}

pub(crate) fn seek(
    shared: &Shared,
    name: &str,
    position: Position,
) -> Result<CursorInfo, CursorError> {
    check_inactive(shared, name)?;
    let txn = crate::durable::txn::write(shared)?;
    {
        let mut cursors = txn.open_table(CURSORS).map_err(StorageError::from)?;
        let mut rec: CursorRecord = match cursors.get(name).map_err(StorageError::from)? {
            Some(v) => from_bytes(v.value(), "cursors", name)?,
            None => return Err(CursorError::Unknown(name.to_owned())),
        };
        let rtxn = shared.db.begin_read().map_err(StorageError::from)?;
        let first = resolve(&rtxn, position).map_err(|e| match e {
            ReadError::UnknownEvent(id) => CursorError::UnknownEvent(id),
            ReadError::Storage(s) => CursorError::Storage(s),
            ReadError::Closed => CursorError::Closed,
        })?;
        rec.delivered = first - 1;
        rec.updated_ns = now_ns();
        cursors
            .insert(name, to_bytes(&rec).as_slice())
            .map_err(StorageError::from)?;
    }
    txn.commit().map_err(StorageError::from)?;
    get_cursor(&shared.db, Some(shared), name)
}

pub(crate) fn delete(shared: &Shared, name: &str) -> Result<(), CursorError> {
    check_inactive(shared, name)?;
    let txn = crate::durable::txn::write(shared)?;
    {
        let mut cursors = txn.open_table(CURSORS).map_err(StorageError::from)?;
        if cursors.remove(name).map_err(StorageError::from)?.is_none() {
            return Err(CursorError::Unknown(name.to_owned()));
        }
        let mut dead = txn.open_table(DEAD_LETTERS).map_err(StorageError::from)?;
        dead.retain_in((name, 0u64)..=(name, u64::MAX), |_, _| false)
            .map_err(StorageError::from)?;
    }
    txn.commit().map_err(StorageError::from)?;
    Ok(())
}
