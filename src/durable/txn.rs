//! The one place write transactions are opened: every caller, the log's and
//! the webhook registry's, gets the same durability, quick repair and
//! poison check, so they can't drift apart (they did: `sync(false)` once
//! made the registry ask for non-durable commits, which redb refuses in
//! `SingleWriter` mode, and every webhook write failed).
//!
//! Durability:
//! - structural commits (creating the tables, recording the WAL's state)
//!   are always `Immediate`: a crash must never roll back the log's id or
//!   the record that a WAL is in use;
//! - data commits are `Immediate` too, except with `sync(false)`, exclusive
//!   access (`shared_reads(false)`) and no WAL, where they skip their fsync
//!   (`None`). redb refuses non-durable commits when other processes may
//!   read the file, and with a WAL the applier's commits must be durable
//!   before the WAL may start a new generation (a `None` commit rolls back
//!   on a crash, and the frames would be gone).
//!
//! No user code may run while a transaction from here is open: a handler
//! would hold the write lock, and with it every publish and read.

use redb::{Database, Durability, WriteTransaction};

use super::{Options, Shared};
use crate::error::StorageError;

/// The durability of data commits under `opts`, with or without a WAL.
fn durability(opts: &Options, wal_in_use: bool) -> Durability {
    if opts.sync || opts.shared_reads || wal_in_use {
        Durability::Immediate
    } else {
        Durability::None
    }
}

fn begin_with(
    db: &Database,
    opts: &Options,
    durability: Durability,
) -> Result<WriteTransaction, StorageError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(durability)?;
    txn.set_quick_repair(opts.quick_repair);
    Ok(txn)
}

/// A structural write transaction (always durable), for the open, before
/// the bus's shared state exists, and for the WAL's state.
///
/// # Errors
/// [`StorageError`] when redb can't begin one.
pub(crate) fn structural(db: &Database, opts: &Options) -> Result<WriteTransaction, StorageError> {
    begin_with(db, opts, Durability::Immediate)
}

/// A data write transaction without the poison check (the applier and WAL
/// replay, which check it themselves).
///
/// # Errors
/// [`StorageError`] when redb can't begin one.
pub(crate) fn begin(shared: &Shared) -> Result<WriteTransaction, StorageError> {
    let wal_in_use = shared.path.is_some() && shared.opts.wal;
    begin_with(
        &shared.db,
        &shared.opts,
        durability(&shared.opts, wal_in_use),
    )
}

/// A data write transaction on the bus's file.
///
/// # Errors
/// [`StorageError::Poisoned`] once a failed commit or a panicked
/// background thread poisoned the bus; [`StorageError`] when redb can't
/// begin one.
pub(crate) fn write(shared: &Shared) -> Result<WriteTransaction, StorageError> {
    if shared.poisoned.load(std::sync::atomic::Ordering::Acquire) {
        return Err(StorageError::Poisoned);
    }
    begin(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sync_off_exclusive_and_without_a_wal_skips_the_fsync() {
        for bits in 0..8u8 {
            let opts = Options {
                sync: bits & 1 != 0,
                shared_reads: bits & 2 != 0,
                ..Options::default()
            };
            let wal = bits & 4 != 0;
            let skips = matches!(durability(&opts, wal), Durability::None);
            assert_eq!(skips, bits == 0, "{bits:03b}");
        }
    }
}
