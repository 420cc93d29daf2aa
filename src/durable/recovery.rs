//! Opening a log's write-ahead log: never silently skipped.
//!
//! The log file records whether a WAL may hold acknowledged events it does
//! not (`meta["wal"]`: in use, with the WAL's generation when this process
//! opened it), so that:
//! - a WAL that is missing, another log's, or an older copy (a generation
//!   below the recorded one: each open starts a new generation, so a copy
//!   taken before the last open is detected; one taken during the same run
//!   is not) is refused with [`OpenError::WalMissing`]
//!   unless the loss is accepted explicitly (`accept_wal_loss`);
//! - opening with `write_ahead_log(false)` still replays an existing WAL
//!   first, then records it clean, so no acknowledged event is lost, no
//!   `seq` reused, and no stale frame replayed by a later open;
//! - a clean close records the WAL clean again (everything is in the file),
//!   so deleting the `.wal` after a clean close loses nothing and opens.
//!
//! Logs written before this record existed have none: their WAL is replayed
//! when present, as before, and a missing one can't be detected.
//!
//! Invariant: while `meta["wal"]` says in use with generation `g`, every
//! acknowledged event not in the file is in the WAL at a generation `>= g`
//! (generations only grow, and a new one starts only once the file holds
//! every event of the old).

use std::path::Path;
use std::sync::Arc;

use super::tables::{META, META_WAL};
use super::wal::{self, Wal};
use super::{Shared, commit};
use crate::error::{OpenError, StorageError};

/// What `meta["wal"]` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalState {
    /// A WAL may hold acknowledged events the file does not.
    pub(crate) in_use: bool,
    /// The WAL's generation when it was recorded.
    pub(crate) generation: u64,
}

impl WalState {
    fn encode(self) -> [u8; 9] {
        let mut b = [0u8; 9];
        b[0] = u8::from(self.in_use);
        b[1..].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<WalState> {
        Some(WalState {
            in_use: *b.first()? == 1,
            generation: u64::from_le_bytes(b.get(1..9)?.try_into().ok()?),
        })
    }
}

/// The recorded WAL state of a log (`None` for a log that never recorded
/// one).
pub(crate) fn read_state(txn: &redb::ReadTransaction) -> Result<Option<WalState>, StorageError> {
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(meta
        .get(META_WAL)?
        .and_then(|v| WalState::decode(v.value())))
}

/// Records the WAL state, durably.
pub(crate) fn write_state(shared: &Shared, state: WalState) -> Result<(), StorageError> {
    let txn = super::txn::structural(&shared.db, &shared.opts)?;
    txn.open_table(META)?
        .insert(META_WAL, state.encode().as_slice())?;
    txn.commit()?;
    Ok(())
}

/// Why the WAL at `wal_path` can't be trusted to hold what `state` says it
/// holds, if it can't.
fn missing_reason(
    state: Option<WalState>,
    info: Option<&wal::WalInfo>,
    log_id: [u8; 16],
) -> Option<String> {
    let recorded = state.filter(|s| s.in_use)?;
    match info {
        None => Some("is missing".into()),
        Some(i) if i.log_id != log_id => Some("belongs to another log file".into()),
        Some(i) if i.generation < recorded.generation => Some(format!(
            "is an older copy (generation {}, the log recorded {})",
            i.generation, recorded.generation
        )),
        Some(_) => None,
    }
}

/// Opens the WAL of a log opened from `path` and replays what the file does
/// not hold yet. Returns the WAL to write through, or `None` when the bus
/// runs without one (`write_ahead_log(false)`; an existing WAL was replayed
/// and recorded clean first).
///
/// # Errors
/// [`OpenError::WalMissing`] (see the module docs), [`OpenError::Io`] for
/// a WAL that can't be read or is not a WAL, [`OpenError::Storage`] when
/// replaying fails.
pub(crate) fn open_wal(
    shared: &Arc<Shared>,
    path: &Path,
    log_id: [u8; 16],
) -> Result<Option<Wal>, OpenError> {
    let wal_path = wal::path_for(path);
    let io = |e| OpenError::Io(wal_path.clone(), e);
    let state = {
        let txn = redb::ReadableDatabase::begin_read(&shared.db)
            .map_err(|e| OpenError::Storage(e.into()))?;
        read_state(&txn).map_err(OpenError::Storage)?
    };
    let info = wal::inspect(&wal_path, wal::Inspect::Header).map_err(io)?;
    let lost = missing_reason(state, info.as_ref(), log_id);
    if let Some(reason) = &lost {
        if !shared.opts.accept_wal_loss {
            return Err(OpenError::WalMissing {
                wal: wal_path,
                reason: reason.clone(),
            });
        }
        tracing::warn!(
            wal = %wal_path.display(),
            %reason,
            last_seq = shared.last_seq.load(std::sync::atomic::Ordering::Acquire),
            "opening without the write-ahead log, as accepted: acknowledged events after the \
             file's last seq are lost, and their seqs will be reused"
        );
    }
    if !shared.opts.wal && info.is_none() {
        if state.is_some_and(|s| s.in_use) {
            // The loss was accepted above.
            write_state(
                shared,
                WalState {
                    in_use: false,
                    generation: 0,
                },
            )
            .map_err(OpenError::Storage)?;
        }
        return Ok(None);
    }
    let (mut w, frames) = Wal::open(
        &wal_path,
        log_id,
        shared.opts.sync,
        shared.opts.wal_faults.clone(),
        shared.opts.wal_io.as_ref(),
    )
    .map_err(io)?;
    w.limit_fill(shared.opts.wal_restart_bytes);
    if lost.is_some() {
        // The loss was accepted: what this WAL holds (an older copy's
        // frames, say) is not what the file lacks, and is not replayed.
        w.reset().map_err(io)?;
    } else if !frames.is_empty() {
        let n = commit::recover(shared, &mut w, frames).map_err(OpenError::Storage)?;
        if n > 0 {
            tracing::info!(events = n, "replayed events from the write-ahead log");
        }
    }
    if shared.opts.wal {
        // A new generation for this run: a copy of the WAL taken before
        // it has a lower one, and is refused as older after a crash.
        w.reset().map_err(io)?;
        write_state(
            shared,
            WalState {
                in_use: true,
                generation: w.generation(),
            },
        )
        .map_err(OpenError::Storage)?;
        return Ok(Some(w));
    }
    // Without a WAL from now on: the file holds everything; a later open
    // with the WAL finds a new generation with no frames.
    w.trim().map_err(io)?;
    write_state(
        shared,
        WalState {
            in_use: false,
            generation: w.generation(),
        },
    )
    .map_err(OpenError::Storage)?;
    Ok(None)
}

/// The `seq`s of the events in `info`'s frames that the file does not hold.
fn pending_seqs(
    txn: &redb::ReadTransaction,
    info: &wal::WalInfo,
) -> Result<Vec<u64>, StorageError> {
    let in_file = super::read::last_assigned(txn)?;
    Ok(info
        .frames
        .iter()
        .flat_map(|f| (0..f.records.len() as u64).map(move |i| f.first_seq + i))
        .filter(|seq| *seq > in_file)
        .collect())
}

/// Events of the log at `path` that wait in its WAL with no process to
/// apply them (after a crash, before a writable open recovered them).
pub(crate) fn unrecovered(txn: &redb::ReadTransaction, path: &Path) -> Result<u64, StorageError> {
    match wal::inspect(&wal::path_for(path), wal::Inspect::FramesUnlessOwned) {
        Ok(Some(info)) if !info.owned => Ok(pending_seqs(txn, &info)?.len() as u64),
        _ => Ok(0),
    }
}

/// What `check` says of the WAL of the log at `path`: the events waiting in
/// it (`wal_pending_events`), a problem when they wait with no owner to
/// apply them, and a problem when the WAL the file relies on is missing,
/// foreign, older or unreadable.
pub(crate) fn check_wal(
    txn: &redb::ReadTransaction,
    path: &Path,
    report: &mut super::CheckReport,
) -> Result<(), StorageError> {
    let wal_path = wal::path_for(path);
    let state = read_state(txn)?;
    let log_id: Option<[u8; 16]> = match txn.open_table(META) {
        Ok(meta) => meta
            .get(super::tables::META_LOG_ID)?
            .and_then(|v| v.value().try_into().ok()),
        Err(_) => None,
    };
    let Some(log_id) = log_id else {
        return Ok(());
    };
    let info = match wal::inspect(&wal_path, wal::Inspect::Frames) {
        Ok(info) => info,
        Err(e) => {
            report.problems.push(format!(
                "the write-ahead log {} can't be read: {e}",
                wal_path.display()
            ));
            return Ok(());
        }
    };
    if let Some(reason) = missing_reason(state, info.as_ref(), log_id) {
        report.problems.push(format!(
            "the write-ahead log {} {reason}: acknowledged events may be lost",
            wal_path.display()
        ));
        return Ok(());
    }
    let Some(info) = info.filter(|i| i.log_id == log_id) else {
        return Ok(());
    };
    let pending = pending_seqs(txn, &info)?;
    report.wal_pending_events = pending.len() as u64;
    if let (Some(first), Some(last), false) = (pending.first(), pending.last(), info.owned) {
        report.problems.push(format!(
            "{} acknowledged event(s), seq {first}-{last}, are in the write-ahead log only, not \
             yet in the file (the last writer stopped without applying them): open the log \
             for writing once to recover them",
            pending.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        for s in [
            WalState {
                in_use: true,
                generation: 7,
            },
            WalState {
                in_use: false,
                generation: u64::MAX,
            },
        ] {
            assert_eq!(WalState::decode(&s.encode()), Some(s));
        }
        assert_eq!(WalState::decode(&[1, 2]), None);
    }
}
