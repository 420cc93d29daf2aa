//! Opening the log named by `--db`: read-only for reading commands (they
//! work while another process writes), exclusively for writing commands
//! (which fail with a clear message when the log is in use).

use std::path::Path;

use ctrlbus::{DurableBus, OpenError, ReadOnlyLog};

use super::error::{CliError, Result};

/// Opens the log for reading. A log left by a crashed writer is repaired
/// first, when no other process holds it (any writable open repairs it).
pub(crate) fn read_only(path: &Path) -> Result<ReadOnlyLog> {
    match ReadOnlyLog::open(path) {
        Ok(log) => Ok(log),
        Err(OpenError::NeedsRecovery(_)) => {
            eprintln!(
                "ctrlbus: {} was not closed cleanly; repairing it",
                path.display()
            );
            drop(DurableBus::open(path).map_err(open_error)?);
            ReadOnlyLog::open(path).map_err(open_error)
        }
        Err(e) => Err(open_error(e)),
    }
}

/// Opens the log for writing; `create` allows a new file.
pub(crate) fn writable(path: &Path, create: bool) -> Result<DurableBus> {
    if !create && !path.exists() {
        return Err(CliError::msg(format!("no log at {}", path.display())));
    }
    DurableBus::open(path).map_err(open_error)
}

/// redb's page cache for `publish`: a one-shot append gains nothing from
/// a large cache, and with 1 MiB events the default 32 MiB would be most of
/// its memory (40 MiB peak instead of 60 MiB for a file of them).
const PUBLISH_CACHE_BYTES: usize = 8 << 20;

/// Opens the log for `publish` (created if missing), with a page cache
/// sized for one-shot appends.
pub(crate) fn for_publish(path: &Path) -> Result<DurableBus> {
    DurableBus::builder()
        .cache_bytes(PUBLISH_CACHE_BYTES)
        .open(path)
        .map_err(open_error)
}

/// The message for a failed open.
pub(crate) fn open_error(e: OpenError) -> CliError {
    CliError::msg(e)
}
