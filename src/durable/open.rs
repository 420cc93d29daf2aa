//! Opening a file: telling a ctrlbus log from anything else before a byte is
//! written, and creating the tables of a new one.

use std::io::Read;
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable};

use super::tables::{
    BY_ID, CURSORS, DEAD_LETTERS, EVENT_BLOCKS, EVENTS, FORMAT_VERSION, META, META_FORMAT,
    META_LOG_ID,
};
use crate::error::{OpenError, StorageError};

/// redb's file magic (the first 9 bytes of every redb file).
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// Refuses a file that is not a redb file, without modifying it. A missing
/// or empty file is fine when `create` is set.
pub(crate) fn check_file(path: &Path, create: bool) -> Result<(), OpenError> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(OpenError::NotFound(path.to_path_buf()));
        }
        Err(e) => return Err(OpenError::Io(path.to_path_buf(), e)),
    };
    let mut head = [0u8; 9];
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(OpenError::Io(path.to_path_buf(), e)),
        }
    }
    if got == 0 && create {
        return Ok(());
    }
    if got < head.len() || head != REDB_MAGIC {
        return Err(OpenError::NotCtrlbus {
            path: path.to_path_buf(),
            reason: "not a redb database file".into(),
        });
    }
    Ok(())
}

/// Checks the format of an existing, non-empty file through a read-only
/// open, before any writable open: redb marks a file when opening it for
/// writing, which must not happen to a file that is not a ctrlbus log or has
/// a newer format. A file that needs recovery after a crash cannot be opened
/// read-only; the writable open repairs it and `prepare` checks it then.
pub(crate) fn check_existing(path: &Path) -> Result<(), OpenError> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() > 0 => {}
        _ => return Ok(()),
    }
    let db = match redb::Builder::new()
        .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
        .open_read_only(path)
    {
        Ok(db) => db,
        Err(e) => {
            return match map_open_error(path, e) {
                OpenError::NeedsRecovery(_) => Ok(()),
                other => Err(other),
            };
        }
    };
    let txn = db.begin_read().map_err(|e| OpenError::Storage(e.into()))?;
    check_format(&txn, path)?;
    Ok(())
}

pub(crate) fn map_open_error(path: &Path, e: redb::DatabaseError) -> OpenError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => OpenError::InUse(path.to_path_buf()),
        redb::DatabaseError::RepairAborted => OpenError::NeedsRecovery(path.to_path_buf()),
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => {
            OpenError::Io(path.to_path_buf(), io)
        }
        other => {
            let text = other.to_string();
            if text.contains("repair") || text.contains("recovery") {
                OpenError::NeedsRecovery(path.to_path_buf())
            } else {
                OpenError::Storage(StorageError::from(other))
            }
        }
    }
}

/// Checks the format of an opened file: a ctrlbus log of a version this
/// build reads. `Ok(true)` when the file holds no tables at all (new).
pub(crate) fn check_format(txn: &redb::ReadTransaction, path: &Path) -> Result<bool, OpenError> {
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            let any = txn
                .list_tables()
                .map_err(|e| OpenError::Storage(e.into()))?
                .next()
                .is_some();
            return if any {
                Err(OpenError::NotCtrlbus {
                    path: path.to_path_buf(),
                    reason: "a redb database without ctrlbus tables".into(),
                })
            } else {
                Ok(true)
            };
        }
        Err(e) => return Err(OpenError::Storage(e.into())),
    };
    let version = meta
        .get(META_FORMAT)
        .map_err(|e| OpenError::Storage(e.into()))?
        .and_then(|v| v.value().first().copied());
    match version {
        None => Err(OpenError::NotCtrlbus {
            path: path.to_path_buf(),
            reason: "no format version".into(),
        }),
        Some(v) if v > FORMAT_VERSION => Err(OpenError::NewerFormat {
            found: v,
            supported: FORMAT_VERSION,
        }),
        Some(_) => Ok(false),
    }
}

/// Checks an opened writable database, creates the tables of a new log, and
/// returns the log's id (made on first open).
pub(crate) fn prepare(
    db: &redb::Database,
    path: &Path,
    opts: &super::Options,
    hooks: &[std::sync::Arc<dyn super::AppendHook>],
) -> Result<[u8; 16], OpenError> {
    let txn = db.begin_read().map_err(|e| OpenError::Storage(e.into()))?;
    let fresh = check_format(&txn, path)?;
    drop(txn);
    // Create any table a newer build of the same format added; cheap when
    // they all exist.
    let txn = super::txn::structural(db, opts).map_err(OpenError::Storage)?;
    let log_id;
    {
        let st = |e: redb::TableError| OpenError::Storage(e.into());
        let mut meta = txn.open_table(META).map_err(st)?;
        let stored = meta
            .get(META_FORMAT)
            .map_err(|e| OpenError::Storage(e.into()))?
            .and_then(|v| v.value().first().copied());
        // A new log, or an upgrade (`check_format` refused newer ones): from
        // this commit on, an older build refuses the file.
        if fresh || stored.is_some_and(|v| v < FORMAT_VERSION) {
            meta.insert(META_FORMAT, [FORMAT_VERSION].as_slice())
                .map_err(|e| OpenError::Storage(e.into()))?;
        }
        let existing: Option<[u8; 16]> = meta
            .get(META_LOG_ID)
            .map_err(|e| OpenError::Storage(e.into()))?
            .and_then(|v| v.value().try_into().ok());
        log_id = if let Some(id) = existing {
            id
        } else {
            let mut id = [0u8; 16];
            getrandom::fill(&mut id).map_err(|e| {
                OpenError::Io(path.to_path_buf(), std::io::Error::other(e.to_string()))
            })?;
            meta.insert(META_LOG_ID, id.as_slice())
                .map_err(|e| OpenError::Storage(e.into()))?;
            id
        };
        txn.open_table(EVENTS).map_err(st)?;
        txn.open_table(EVENT_BLOCKS).map_err(st)?;
        txn.open_table(BY_ID).map_err(st)?;
        txn.open_table(CURSORS).map_err(st)?;
        txn.open_table(DEAD_LETTERS).map_err(st)?;
        for hook in hooks {
            hook.create_tables(&txn).map_err(OpenError::Storage)?;
        }
    }
    super::id_index::prepare(&txn).map_err(OpenError::Storage)?;
    txn.commit().map_err(|e| OpenError::Storage(e.into()))?;
    Ok(log_id)
}
