//! Opening the log named by `--db`: read-only for reading commands (they
//! work while another process writes), exclusively for writing commands
//! (which fail with a clear message when the log is in use).

use std::path::Path;

use std::sync::atomic::{AtomicBool, Ordering};

use ctrlbus::{DurableBus, DurableBusBuilder, OpenError, ReadOnlyLog};

use super::error::{CliError, Result};

/// Whether `--accept-wal-loss` was given (set once, in `main`).
static ACCEPT_WAL_LOSS: AtomicBool = AtomicBool::new(false);

/// Lets writable opens go on without the write-ahead log the file relies
/// on (`--accept-wal-loss`).
pub(crate) fn accept_wal_loss(accept: bool) {
    ACCEPT_WAL_LOSS.store(accept, Ordering::Relaxed);
}

fn builder() -> DurableBusBuilder {
    DurableBus::builder().accept_wal_loss(ACCEPT_WAL_LOSS.load(Ordering::Relaxed))
}

/// Opens the log for reading. A log left by a crashed writer is recovered
/// first, when no other process holds it (any writable open repairs the
/// file and replays the write-ahead log): otherwise `stats`, `replay` and
/// `check` would not see the events acknowledged just before the crash.
pub(crate) fn read_only(path: &Path) -> Result<ReadOnlyLog> {
    let recover = || -> Result<ReadOnlyLog> {
        drop(builder().open(path).map_err(open_error)?);
        eprintln!(
            "ctrlbus: {} was not closed cleanly; recovered it",
            path.display()
        );
        ReadOnlyLog::open(path).map_err(open_error)
    };
    match ReadOnlyLog::open(path) {
        Ok(log) if log.unrecovered_events()? > 0 => {
            drop(log);
            recover()
        }
        Ok(log) => Ok(log),
        Err(OpenError::NeedsRecovery(_)) => recover(),
        Err(e) => Err(open_error(e)),
    }
}

/// Opens the log for writing; `create` allows a new file.
pub(crate) fn writable(path: &Path, create: bool) -> Result<DurableBus> {
    if !create && !path.exists() {
        return Err(CliError::msg(format!("no log at {}", path.display())));
    }
    builder().open(path).map_err(open_error)
}

/// redb's page cache for `publish`: a one-shot append gains nothing from
/// a large cache, and with 1 MiB events the default 32 MiB would be most of
/// its memory (40 MiB peak instead of 60 MiB for a file of them).
const PUBLISH_CACHE_BYTES: usize = 8 << 20;

/// Opens the log for `publish` (created if missing), with a page cache
/// sized for one-shot appends.
pub(crate) fn for_publish(path: &Path) -> Result<DurableBus> {
    builder()
        .cache_bytes(PUBLISH_CACHE_BYTES)
        .open(path)
        .map_err(open_error)
}

/// The message for a failed open.
pub(crate) fn open_error(e: OpenError) -> CliError {
    CliError::msg(e)
}
