//! [`DurableBus`]: the event bus on a redb file.
//!
//! How a publish flows (guarantees G1–G4 of DESIGN.md):
//!
//! 1. The publisher validates the event and encodes its record on its own
//!    thread, then queues it (`commit/publish.rs`).
//! 2. One committer at a time (a waiting publisher, or the writer thread for
//!    publishes nobody waits for) takes every publish queued, assigns
//!    consecutive `seq`s and makes the group durable with one fsync of the
//!    write-ahead log (`wal`): group commit (`commit/mod.rs`).
//! 3. Only then does anyone see the events: the committer queues the group
//!    for fan-out and wakes the publishers. The applier thread
//!    (`commit/applier.rs`) moves the group into the redb file within
//!    `apply_interval`, in one durable commit with what the append hooks
//!    write (the webhook delivery records) and the subscriptions'
//!    positions; reads in this process wait for that, and after a crash the
//!    WAL is replayed into the file (`recovery`, `commit/replay.rs`).
//! 4. Fan-out runs groups strictly in `seq` order, one thread at a time (the
//!    thread holding the fan-out baton, one of the waiting publishers), so
//!    every live subscriber sees events in `seq` order
//!    (`commit/fanout.rs`). A publisher returns once its own group has been
//!    fanned out.
//!
//! Durable subscriptions (`subscription`) are live while caught up and
//! detach into catch-up from the log on their own thread when their handler
//! fails or is slow; the switch back to live happens under the fan-out lock
//! at an exact `seq`, so there is no gap and no duplicate. Their cursors'
//! records and administration are in `subscription/cursors.rs`.
//!
//! The seams, each in one place:
//! - `hooks`: the append-hook trait, the log's only extension point. The
//!   log knows nothing of webhooks; hooks are handed in by the builder.
//! - `txn`: every write transaction (durability, quick repair, poison).
//! - `wal` (with its file layer `WalIo`) and `recovery`: the WAL is never
//!   skipped; a missing, foreign or stale one is refused.
//! - `open`: telling a ctrlbus log from any other file before writing.
//! - `crate::sync::PoisonDart`: a background thread that panics poisons the
//!   bus instead of leaving callers waiting.

/// The byte-range lock methods of a `redb::StorageBackend` that wraps
/// another in its field `$inner`, each passed through unchanged: redb's
/// multi-process modes lock the file through them, and a wrapper that
/// kept the trait's defaults (`Unsupported`) would fail every open.
#[cfg(any(test, target_os = "linux"))]
macro_rules! forward_lock_methods {
    ($inner:ident) => {
        fn try_lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.$inner.try_lock_range(start, end)
        }
        fn try_lock_shared_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.$inner.try_lock_shared_range(start, end)
        }
        fn lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.$inner.lock_range(start, end)
        }
        fn lock_shared_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.$inner.lock_shared_range(start, end)
        }
        fn unlock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.$inner.unlock_range(start, end)
        }
        fn query_lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.$inner.query_lock_range(start, end)
        }
    };
}

#[cfg(feature = "tokio")]
mod async_api;
#[cfg(test)]
mod background_panics;
mod codec;
mod commit;
mod event_blocks;
#[cfg(target_os = "linux")]
mod file_ahead;
mod hooks;
mod id_index;
mod open;
#[cfg(test)]
mod power_loss;
mod read;
mod read_tail;
mod recent_ids;
mod recovery;
mod subscription;
mod tables;
pub(crate) mod txn;
mod upkeep;
mod wal;
mod wal_ahead;
#[cfg(target_os = "linux")]
mod wal_direct;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use jiff::Timestamp;

pub use read::{LogEntry, LogReader, Position, ReadOnlyLog};
#[cfg(feature = "jetstream")]
pub(crate) use subscription::valid_name as valid_subscription_name;
pub use subscription::{CursorInfo, CursorState, DeadLetter, DurableSubscription, RedriveReport};
#[cfg(feature = "tokio")]
pub(crate) use subscription::{Pull, Verdict};
pub use upkeep::{CheckReport, RetainReport, Retention, Stats};

pub use commit::MAX_BATCH_BYTES;
pub(crate) use hooks::{AppendHook, HookFactories, HookFactory};

/// Decodes a stored record into its append time and event (for fuzzing).
#[cfg(feature = "fuzzing")]
pub(crate) fn codec_decode_to_event(bytes: &[u8]) -> Result<(i64, Event), String> {
    let (append, rec) = codec::decode_ref(bytes)?;
    Ok((append, rec.to_event()?))
}

/// The records of a stored block, or why its layout is refused (for
/// fuzzing).
#[cfg(feature = "fuzzing")]
pub(crate) fn block_records(bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    event_blocks::records(bytes)
}

/// A stored block of `records` (for fuzzing).
#[cfg(feature = "fuzzing")]
pub(crate) fn block_encode(records: &[&[u8]]) -> Vec<u8> {
    event_blocks::encode(records)
}

/// Encodes an event as a stored record (for fuzzing).
#[cfg(feature = "fuzzing")]
pub(crate) fn codec_encode(event: &Event, append_ns: i64) -> Vec<u8> {
    let mut out = Vec::new();
    let payload = if event.payload.is_empty() {
        Vec::new()
    } else {
        event.payload_json()
    };
    codec::encode(event, append_ns, &payload, &mut out);
    out
}
pub(crate) use tables::{from_bytes as decode_record, to_bytes as encode_record};

use crate::bus::{Bus, Detach, Handler, Receipt, Subscription};
use crate::error::{CursorError, OpenError, PublishError, ReadError, StorageError, SubscribeError};
use crate::event::{DEFAULT_MAX_PAYLOAD_BYTES, Event};
use crate::fanout::Subscribers;
use crate::filter::Filter;
use crate::sync::{Condvar, Mutex, RwLock};

/// Default redb page cache of a bus: enough for the hot end of the log and
/// the indexes, small enough for a control plane's sidecar. 16 MiB, not 32:
/// with `MAX_UNAPPLIED` at 5,000 it lowered the peak RSS of `bench publish`
/// at 64 publishers from a median of 85.5 to 62.5 MiB (8 interleaved runs
/// each), throughput and CPU per event unchanged (BENCHMARKS.md, "Memory").
pub(crate) const DEFAULT_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// The page cache of a [`ReadOnlyLog`]: replays read the whole log, and
/// gain from more (BENCHMARKS.md, "Replay").
pub(crate) const READ_ONLY_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// The options of a [`DurableBus`], set through [`DurableBusBuilder`].
#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // each is an independent switch
pub(crate) struct Options {
    pub(crate) cache_bytes: usize,
    pub(crate) sync: bool,
    pub(crate) quick_repair: bool,
    pub(crate) shared_reads: bool,
    pub(crate) max_payload_bytes: usize,
    pub(crate) max_group_events: usize,
    pub(crate) max_batch_bytes: usize,
    pub(crate) ack_flush_interval: Duration,
    pub(crate) ack_flush_events: u64,
    pub(crate) max_deliveries: u32,
    pub(crate) retry_backoff: Duration,
    pub(crate) max_retry_backoff: Duration,
    pub(crate) slow_handler: Duration,
    pub(crate) wal: bool,
    pub(crate) accept_wal_loss: bool,
    pub(crate) apply_interval: Duration,
    pub(crate) wal_faults: Option<Arc<AtomicU64>>,
    /// Wraps the WAL's file (the power-loss tests' simulated disk).
    pub(crate) wal_io: Option<wal::WalIoWrap>,
    /// WAL bytes after which the WAL starts a new generation (tests set
    /// it low, to restart often).
    pub(crate) wal_restart_bytes: u64,
    pub(crate) retention: Option<Retention>,
    pub(crate) retention_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cache_bytes: DEFAULT_CACHE_BYTES,
            sync: true,
            quick_repair: true,
            shared_reads: true,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_group_events: 8192,
            max_batch_bytes: MAX_BATCH_BYTES,
            ack_flush_interval: Duration::from_millis(100),
            ack_flush_events: 1000,
            max_deliveries: 5,
            retry_backoff: Duration::from_millis(20),
            max_retry_backoff: Duration::from_secs(5),
            slow_handler: Duration::from_millis(250),
            wal: true,
            accept_wal_loss: false,
            apply_interval: Duration::from_millis(20),
            wal_faults: None,
            wal_io: None,
            wal_restart_bytes: commit::WAL_RESTART_BYTES,
            retention: None,
            retention_interval: Duration::from_secs(60),
        }
    }
}

/// Builds a [`DurableBus`] with options other than the defaults.
///
/// ```no_run
/// # use ctrlbus::DurableBus;
/// # use std::time::Duration;
/// let bus = DurableBus::builder()
///     .cache_bytes(64 << 20)
///     .max_deliveries(10)
///     .open("events.redb")?;
/// # Ok::<(), ctrlbus::OpenError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct DurableBusBuilder {
    opts: Options,
    /// Installed on each bus opened, before recovery.
    hooks: HookFactories,
}

impl DurableBusBuilder {
    /// Bytes of redb page cache (default 16 MiB): the knob that trades
    /// memory for read speed on a large log.
    pub fn cache_bytes(mut self, bytes: usize) -> Self {
        self.opts.cache_bytes = bytes;
        self
    }

    /// Whether each commit is fsync'd before `publish` returns (default
    /// true). Turning it off breaks G2 (acknowledged means durable): after a
    /// crash, recent acknowledged events may be missing. For tests and bulk
    /// loads only. (With `shared_reads`, redb commits stay durable; only the
    /// WAL's fsync is skipped.)
    pub fn sync(mut self, sync: bool) -> Self {
        self.opts.sync = sync;
        self
    }

    /// redb quick repair (default true): each commit saves the allocator
    /// state, so reopening after a crash takes milliseconds at any size
    /// instead of a full scan of the file (seconds per GiB).
    pub fn quick_repair(mut self, on: bool) -> Self {
        self.opts.quick_repair = on;
        self
    }

    /// Whether other processes may read the file while this one writes it
    /// (default true; redb's `SingleWriter` mode, which commits in two
    /// phases). When false the file is locked exclusively.
    pub fn shared_reads(mut self, on: bool) -> Self {
        self.opts.shared_reads = on;
        self
    }

    /// Largest payload accepted, in bytes of compact JSON (default 1 MiB).
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.opts.max_payload_bytes = bytes;
        self
    }

    /// Most events in one group commit (default 8192).
    pub fn max_group_events(mut self, n: usize) -> Self {
        self.opts.max_group_events = n.max(1);
        self
    }

    /// Largest `publish_batch`, in bytes of encoded events (default and
    /// most: [`MAX_BATCH_BYTES`], 256 MiB). A batch is one write-ahead-log
    /// frame, written whole or not at all; a larger one is refused with
    /// [`PublishError::BatchTooLarge`]. Group commits stay within it too.
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.opts.max_batch_bytes = bytes.clamp(1, MAX_BATCH_BYTES);
        self
    }

    /// How often acknowledged cursor positions are stored when nothing is
    /// published (default 100 ms). Positions are also stored with every
    /// group commit.
    pub fn ack_flush_interval(mut self, d: Duration) -> Self {
        self.opts.ack_flush_interval = d.max(Duration::from_millis(1));
        self
    }

    /// How many unstored acknowledgements a subscription may have before its
    /// position is stored at once (default 1000). With the flush interval,
    /// this bounds how many events a subscription sees again after a crash.
    pub fn ack_flush_events(mut self, n: u64) -> Self {
        self.opts.ack_flush_events = n.max(1);
        self
    }

    /// Deliveries of one event to a durable subscription before it goes to
    /// the dead letters (default 5).
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.opts.max_deliveries = n.max(1);
        self
    }

    /// First wait before redelivering after a handler error (default 20 ms;
    /// doubles on each attempt up to `max_retry_backoff`, default 5 s).
    pub fn retry_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.opts.retry_backoff = first;
        self.opts.max_retry_backoff = max.max(first);
        self
    }

    /// A live durable subscriber whose handler takes longer than this on one
    /// event is detached into catch-up on its own thread, so publishers stop
    /// waiting for it (default 250 ms).
    pub fn slow_handler(mut self, d: Duration) -> Self {
        self.opts.slow_handler = d;
        self
    }

    /// Whether publishes are made durable through a write-ahead log beside
    /// the file (`<path>.wal`, default true): one fsync per group commit
    /// instead of redb's two-phase commit, which is about 2.4 fsyncs. The
    /// records are applied to the redb file, durably, every `apply_interval`
    /// and at close. Ignored for [`DurableBusBuilder::open_backend`]. Turned
    /// off on a log whose WAL holds events, it replays them first: an
    /// existing WAL is never skipped.
    pub fn write_ahead_log(mut self, on: bool) -> Self {
        self.opts.wal = on;
        self
    }

    /// Open even when the write-ahead log the file says it was written
    /// through is missing, another log's, or an older copy (default false:
    /// [`OpenError::WalMissing`]). The events acknowledged through that WAL
    /// and not yet in the file are then lost, and their `seq`s reused: for
    /// an operator who has decided so, never a default.
    pub fn accept_wal_loss(mut self, accept: bool) -> Self {
        self.opts.accept_wal_loss = accept;
        self
    }

    /// How long events acknowledged through the WAL may wait before they are
    /// applied to the redb file in one durable commit (default 20 ms).
    /// Readers in other processes see new events at these points; in this
    /// process, reads wait for the events published before them.
    pub fn apply_interval(mut self, d: Duration) -> Self {
        self.opts.apply_interval = d.max(Duration::from_micros(100));
        self
    }

    /// Fault injection for tests: each write and each fsync of a WAL frame
    /// takes one from `countdown`; the step that finds it at zero fails (a
    /// write fails after writing half the frame). Not part of the API.
    #[cfg(feature = "fuzzing")]
    #[doc(hidden)]
    pub fn wal_fault_countdown(mut self, countdown: Arc<AtomicU64>) -> Self {
        self.opts.wal_faults = Some(countdown);
        self
    }

    /// For tests: the write-ahead log starts a new generation once it
    /// holds `bytes` (default 16 MiB), carrying the frames not yet applied.
    /// Not part of the API.
    #[cfg(feature = "fuzzing")]
    #[doc(hidden)]
    pub fn wal_restart_after(mut self, bytes: u64) -> Self {
        self.opts.wal_restart_bytes = bytes;
        self
    }

    /// Retention to apply periodically (default none: keep everything).
    pub fn retention(mut self, policy: Retention, every: Duration) -> Self {
        self.opts.retention = Some(policy);
        self.opts.retention_interval = every;
        self
    }

    /// Opens or creates the log at `path`.
    ///
    /// # Errors
    /// [`OpenError::NotCtrlbus`] for a file that is not a ctrlbus log,
    /// [`OpenError::NewerFormat`] for a newer format (the file is not
    /// modified in either case), [`OpenError::InUse`] when another process
    /// has it open for writing, [`OpenError::Io`] / [`OpenError::Storage`]
    /// for I/O failures.
    pub fn open(self, path: impl AsRef<Path>) -> Result<DurableBus, OpenError> {
        let path = path.as_ref();
        open::check_file(path, true)?;
        // A writable open marks the file, so check its format first.
        open::check_existing(path)?;
        // redb would create a missing file with the umask's mode (0644 as a
        // rule) and never fsync its directory: create it first.
        crate::files::ensure_exists(path).map_err(|e| OpenError::Io(path.to_path_buf(), e))?;
        let db = self
            .create_file(path)
            .map_err(|e| open::map_open_error(path, e))?;
        DurableBus::start(db, Some(path.to_path_buf()), self.opts, self.hooks.make())
    }

    /// Opens or creates a log on a custom redb storage backend (fault
    /// injection, in-memory files). A wrapper must pass the lock methods
    /// through to the backend it wraps.
    ///
    /// # Errors
    /// As [`DurableBusBuilder::open`].
    pub fn open_backend(self, backend: impl redb::StorageBackend) -> Result<DurableBus, OpenError> {
        let db = self
            .redb_builder()
            .create_with_backend(backend)
            .map_err(|e| open::map_open_error(Path::new("<backend>"), e))?;
        DurableBus::start(db, None, self.opts, self.hooks.make())
    }

    /// Fault injection for tests: opens the log at `path` as
    /// [`DurableBusBuilder::open`] does, WAL included, but reaches its redb
    /// file through `backend` (a wrapper around that file), so that the
    /// applier's commits can be made to fail. Not part of the API.
    #[cfg(any(test, feature = "fuzzing"))]
    #[doc(hidden)]
    pub fn open_backend_with_wal(
        self,
        path: impl AsRef<Path>,
        backend: impl redb::StorageBackend,
    ) -> Result<DurableBus, OpenError> {
        let path = path.as_ref();
        let db = self
            .redb_builder()
            .create_with_backend(backend)
            .map_err(|e| open::map_open_error(path, e))?;
        DurableBus::start(db, Some(path.to_path_buf()), self.opts, self.hooks.make())
    }

    /// Opens the redb file at `path` as redb's `Builder::create` does. On
    /// Linux with fsyncs on, through `file_ahead::AheadFile`, which
    /// allocates the file's blocks ahead of the applier's writes.
    fn create_file(&self, path: &Path) -> Result<redb::Database, redb::DatabaseError> {
        #[cfg(target_os = "linux")]
        if self.opts.sync {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)?;
            return self
                .redb_builder()
                .create_with_backend(file_ahead::AheadFile::new(file)?);
        }
        self.redb_builder().create(path)
    }

    fn redb_builder(&self) -> redb::Builder {
        let mut b = redb::Builder::new();
        b.set_cache_size(self.opts.cache_bytes);
        if self.opts.shared_reads {
            b.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
        }
        b
    }
}

/// State shared by the bus handles, the writer thread and the subscription
/// workers.
pub(crate) struct Shared {
    pub(crate) db: redb::Database,
    pub(crate) opts: Options,
    pub(crate) path: Option<PathBuf>,
    pub(crate) closed: AtomicBool,
    /// Set when a commit failed in a way that leaves redb unusable.
    pub(crate) poisoned: AtomicBool,
    /// The last `seq` acknowledged (durable in the WAL or the file).
    pub(crate) last_seq: AtomicU64,
    /// The last `seq` in the redb file (visible to read transactions).
    pub(crate) applied_seq: AtomicU64,
    /// Bytes of records acknowledged through the WAL and not yet applied
    /// (added by the committer, taken off by the applier once applied).
    pub(crate) unapplied_bytes: AtomicU64,
    /// The acknowledged groups the file may not hold yet, for reads
    /// (`read_tail`).
    pub(crate) tail: Mutex<read_tail::Tail>,
    /// Plain (non-durable) live subscribers.
    pub(crate) live: Arc<Subscribers>,
    /// Fan-out order and the live durable subscribers (see `commit`).
    pub(crate) fan: Mutex<commit::FanState>,
    /// Durable subscriptions active in this process, by name.
    pub(crate) durable: Mutex<HashMap<String, Arc<subscription::DurableSub>>>,
    /// Called inside each commit (the webhook dispatcher).
    pub(crate) hooks: RwLock<Vec<Arc<dyn AppendHook>>>,
    /// The commit state: taken by the writer thread, or by a waiting
    /// publisher when free (`commit::Pending`); `None` once shut down.
    pub(crate) core: Mutex<Option<commit::Core>>,
    /// Publishes not yet committed (`commit::Pending` commits them).
    pub(crate) queue: Mutex<commit::PublishQueue>,
    /// Signalled when the queue holds the requests a committer gathering
    /// its group waits for (`PublishQueue::gather_until`).
    pub(crate) queue_grew: Condvar,
    /// The writer thread's queue.
    pub(crate) tx: Sender<commit::WriteReq>,
    /// Async publishes waiting for their fan-out (`publish_async`).
    #[cfg(feature = "tokio")]
    pub(crate) completions: commit::completion::Completions,
}

/// A publish submitted with [`DurableBus::submit`], not yet acknowledged.
#[must_use = "an event is acknowledged only when wait returns Ok"]
pub struct PendingPublish(commit::Pending);

impl PendingPublish {
    /// Waits until the event is durable and every caught-up subscriber has
    /// run its handler, and returns its receipt.
    ///
    /// # Errors
    /// As [`Bus::publish`].
    pub fn wait(self) -> Result<Receipt, PublishError> {
        let mut receipts = self.0.wait()?;
        receipts.pop().ok_or(PublishError::Closed)
    }
}

impl std::fmt::Debug for PendingPublish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingPublish")
    }
}

/// The durable event bus. Cloning gives another handle to the same bus; the
/// file is closed when the last handle is dropped or [`Bus::close`] is called.
///
/// See the module docs of this crate for the guarantees (G1–G10).
#[derive(Clone)]
pub struct DurableBus {
    pub(crate) handle: Arc<Handle>,
}

/// Owns the writer thread; closing happens when the last bus handle drops.
pub(crate) struct Handle {
    pub(crate) shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.close();
    }
}

impl Handle {
    fn close(&self) {
        let shared = &self.shared;
        shared.closed.store(true, Ordering::Release);
        // Stop durable subscriptions first: each stores its final position.
        let subs: Vec<_> = shared.durable.lock().drain().map(|(_, s)| s).collect();
        for sub in &subs {
            sub.stop();
        }
        for sub in &subs {
            sub.join();
        }
        let writer = self.writer.lock().take();
        if let Some(writer) = writer {
            let _ = shared.tx.send(commit::WriteReq::Shutdown);
            if writer.thread().id() != std::thread::current().id() {
                let _ = writer.join();
            }
        }
        // After the writer: it is the last to hand over async publishes.
        #[cfg(feature = "tokio")]
        shared.completions.stop();
        shared.live.clear();
        {
            let mut fan = shared.fan.lock();
            fan.live_durable.clear();
            fan.pull_wakers.clear();
        }
    }
}

impl std::fmt::Debug for DurableBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableBus")
            .field("path", &self.handle.shared.path)
            .field(
                "last_seq",
                &self.handle.shared.last_seq.load(Ordering::Relaxed),
            )
            .finish()
    }
}

impl DurableBus {
    /// Opens or creates the log at `path` with the default options.
    ///
    /// # Errors
    /// As [`DurableBusBuilder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<DurableBus, OpenError> {
        DurableBusBuilder::default().open(path)
    }

    /// A builder for options other than the defaults.
    pub fn builder() -> DurableBusBuilder {
        DurableBusBuilder::default()
    }

    fn start(
        db: redb::Database,
        path: Option<PathBuf>,
        opts: Options,
        hooks: Vec<Arc<dyn AppendHook>>,
    ) -> Result<DurableBus, OpenError> {
        let shown = path.clone().unwrap_or_else(|| PathBuf::from("<backend>"));
        let log_id = open::prepare(&db, &shown, &opts, &hooks)?;
        let txn =
            redb::ReadableDatabase::begin_read(&db).map_err(|e| OpenError::Storage(e.into()))?;
        let last = read::last_assigned(&txn).map_err(OpenError::Storage)?;
        let last_append = commit::last_append_ns(&txn).map_err(OpenError::Storage)?;
        drop(txn);
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            db,
            opts,
            path,
            closed: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            last_seq: AtomicU64::new(last),
            applied_seq: AtomicU64::new(last),
            unapplied_bytes: AtomicU64::new(0),
            tail: Mutex::new(read_tail::Tail::default()),
            live: Arc::new(Subscribers::new()),
            fan: Mutex::new(commit::FanState::new(last + 1)),
            durable: Mutex::new(HashMap::new()),
            // Installed before the WAL is replayed below: replayed events
            // reach every hook, as live ones do.
            hooks: RwLock::new(hooks),
            core: Mutex::new(None),
            queue: Mutex::new(commit::PublishQueue::default()),
            queue_grew: Condvar::new(),
            tx,
            #[cfg(feature = "tokio")]
            completions: commit::completion::Completions::default(),
        });
        let mut wal = None;
        let mut last_append = last_append;
        if let Some(path) = shared.path.clone() {
            let before = shared.last_seq.load(Ordering::Acquire);
            wal = recovery::open_wal(&shared, &path, log_id)?;
            if shared.last_seq.load(Ordering::Acquire) != before {
                let txn = redb::ReadableDatabase::begin_read(&shared.db)
                    .map_err(|e| OpenError::Storage(e.into()))?;
                last_append = commit::last_append_ns(&txn).map_err(OpenError::Storage)?;
            }
        }
        *shared.core.lock() = Some(commit::Core::new(shared.clone(), wal, last_append));
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("ctrlbus-writer".into())
            .spawn(move || commit::run_writer(writer_shared, rx))
            .map_err(|e| {
                // Ends the `Shared` → `Core` → `Shared` cycle.
                drop(shared.core.lock().take());
                OpenError::Io(shown, e)
            })?;
        Ok(DurableBus {
            handle: Arc::new(Handle {
                shared,
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Waits until every acknowledged event is in the redb file, so that a
    /// read transaction begun now sees all of them.
    ///
    /// # Errors
    /// [`StorageError::Poisoned`] when the bus can no longer apply (a read
    /// would miss acknowledged events), [`StorageError::CommitFailed`] when
    /// the apply failed or the writer did not answer.
    pub(crate) fn sync_reads(&self) -> Result<(), StorageError> {
        let shared = &self.handle.shared;
        commit::ensure_applied(shared, shared.last_seq.load(Ordering::Acquire)).map_err(|reason| {
            if shared.poisoned.load(Ordering::Acquire) {
                StorageError::Poisoned
            } else {
                StorageError::CommitFailed { reason }
            }
        })
    }

    /// The file's path, if opened from one.
    pub fn path(&self) -> Option<&Path> {
        self.handle.shared.path.as_deref()
    }

    /// The `seq` of the newest event (0 for a log that never had one).
    pub fn last_seq(&self) -> u64 {
        self.handle.shared.last_seq.load(Ordering::Acquire)
    }

    /// Publishes several events atomically: all are committed in one
    /// transaction, with consecutive `seq`s, or none is. Events whose id is
    /// already in the log get their original receipt and are not written
    /// again.
    ///
    /// # Errors
    /// [`PublishError::Invalid`] (naming the bad event),
    /// [`PublishError::DuplicateInBatch`] or [`PublishError::BatchTooLarge`]:
    /// nothing written.
    /// [`PublishError::Storage`]: the commit failed, nothing written.
    /// [`PublishError::Closed`].
    pub fn publish_batch(&self, events: Vec<Event>) -> Result<Vec<Receipt>, PublishError> {
        commit::publish(&self.handle.shared, events)
    }

    /// Hands one event to the log without waiting: the returned
    /// [`PendingPublish`] waits until it is durable and fanned out. Submitting
    /// several events before waiting keeps them all in flight, so one thread
    /// can do the work of several publishers (they may share a group
    /// commit), the way a client keeps several requests in flight on one
    /// connection. The event is acknowledged only when
    /// [`PendingPublish::wait`] returns `Ok`; dropping an unwaited publish
    /// waits for it.
    ///
    /// # Errors
    /// As [`Bus::publish`], for what can be checked before writing
    /// ([`PublishError::Invalid`], [`PublishError::Closed`]).
    pub fn submit(&self, event: Event) -> Result<PendingPublish, PublishError> {
        Ok(PendingPublish(commit::submit(
            &self.handle.shared,
            vec![event],
        )?))
    }

    /// A streaming reader over the log from `from`, yielding events that
    /// match `filter`, in `seq` order. It sees the log as of this call.
    ///
    /// # Errors
    /// [`ReadError::UnknownEvent`] for a [`Position::Id`] not in the log;
    /// [`ReadError::Storage`] when storage fails.
    pub fn read(&self, from: Position, filter: &Filter) -> Result<LogReader, ReadError> {
        let shared = &self.handle.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(ReadError::Closed);
        }
        // A read must see every event acknowledged before it (G1 … G4):
        // those the file does not hold yet are read from memory
        // (`read_tail`), without waiting for the applier.
        let (txn, snap) = read_tail::Snapshot::begin(shared)?;
        LogReader::in_snapshot(&txn, snap, from, filter)
    }

    /// Subscribes a durable, named subscription.
    ///
    /// The first time `name` is used, the cursor starts at `start`; later,
    /// the stored cursor wins and delivery resumes after its last handled
    /// event (`JetStream` durable-consumer semantics). The filter given here
    /// replaces the stored one. The subscription catches up from the log on
    /// its own thread, then receives new events synchronously inside
    /// `publish`, in `seq` order, each at least once.
    ///
    /// # Errors
    /// [`SubscribeError::InvalidName`], [`SubscribeError::AlreadyActive`],
    /// [`SubscribeError::UnknownPosition`] (a start id not in the log),
    /// [`SubscribeError::Closed`], [`SubscribeError::Storage`]. Nothing is
    /// stored on error.
    pub fn subscribe_durable<H: Handler + 'static>(
        &self,
        name: &str,
        filter: Filter,
        start: Position,
        handler: H,
    ) -> Result<DurableSubscription, SubscribeError> {
        // The start position may name events acknowledged through the WAL:
        // `subscribe` resolves it over the file and memory (`read_tail`).
        subscription::subscribe(
            &self.handle.shared,
            name,
            filter,
            start,
            subscription::Consumer::Handler(Box::new(handler)),
        )
    }

    /// Every durable subscription's cursor, by name.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails or a cursor record is corrupted.
    pub fn cursors(&self) -> Result<Vec<CursorInfo>, StorageError> {
        self.sync_reads()?;
        subscription::list_cursors(&self.handle.shared.db, Some(&self.handle.shared))
    }

    /// One cursor.
    ///
    /// # Errors
    /// [`CursorError::Unknown`] for a name with no cursor.
    pub fn cursor(&self, name: &str) -> Result<CursorInfo, CursorError> {
        self.sync_reads()?;
        subscription::get_cursor(&self.handle.shared.db, Some(&self.handle.shared), name)
    }

    /// Moves a cursor: its subscription will next receive the event at
    /// `position` (replay from a time, a `seq` or an id, or skip to the end).
    ///
    /// # Errors
    /// [`CursorError::Unknown`], [`CursorError::Active`] when the
    /// subscription is running in this process (drop it first),
    /// [`CursorError::UnknownEvent`], [`CursorError::Storage`]. Nothing is
    /// changed on error.
    pub fn seek(&self, name: &str, position: Position) -> Result<CursorInfo, CursorError> {
        self.sync_reads()?;
        subscription::seek(&self.handle.shared, name, position)
    }

    /// Deletes a cursor and its dead letters.
    ///
    /// # Errors
    /// [`CursorError::Unknown`], [`CursorError::Active`],
    /// [`CursorError::Storage`].
    pub fn delete_cursor(&self, name: &str) -> Result<(), CursorError> {
        subscription::delete(&self.handle.shared, name)
    }

    /// The dead letters of one subscription, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails.
    pub fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>, StorageError> {
        subscription::dead_letters(&self.handle.shared.db, name)
    }

    /// Counts, bounds and file size.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails.
    pub fn stats(&self) -> Result<Stats, StorageError> {
        let shared = &self.handle.shared;
        let apply_lag = shared
            .last_seq
            .load(Ordering::Acquire)
            .saturating_sub(shared.applied_seq.load(Ordering::Acquire));
        self.sync_reads()?;
        let mut stats = upkeep::stats(&shared.db, shared.path.as_deref())?;
        stats.apply_lag_events = apply_lag;
        // Running subscriptions are ahead of their stored positions.
        for (name, sub) in shared.durable.lock().iter() {
            stats
                .subscription_lag
                .insert(name.clone(), stats.last_seq.saturating_sub(sub.position()));
        }
        Ok(stats)
    }

    /// Verifies every record and index entry; `progress(done, total)` is
    /// called as records are checked.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails; problems found are in the report.
    pub fn check(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<CheckReport, StorageError> {
        self.sync_reads()?;
        let hooks = self.handle.shared.hooks.read().clone();
        upkeep::check(
            &self.handle.shared.db,
            self.handle.shared.path.as_deref(),
            &hooks,
            progress,
        )
    }

    /// Removes the oldest events per `policy`. Sequence numbers are never
    /// reused; cursors behind the new oldest event skip to it and count the
    /// events they missed.
    ///
    /// # Errors
    /// [`StorageError`]; on error nothing was removed.
    pub fn retain(&self, policy: &Retention) -> Result<RetainReport, StorageError> {
        // Count and age the events acknowledged through the WAL too.
        self.sync_reads()?;
        let shared = &self.handle.shared;
        // Between chunks the applier takes redb's write lock: events
        // acknowledged meanwhile reach the file, and reads waiting for them
        // wait for one chunk at most.
        upkeep::retain(shared, policy, &mut || {
            let _ = commit::ensure_applied(shared, shared.last_seq.load(Ordering::Acquire));
        })
    }

    /// Compacts the file at `path`, returning space freed by retention to the
    /// file system. The log must not be open anywhere.
    ///
    /// # Errors
    /// [`OpenError`] when the file cannot be opened exclusively, or
    /// compaction fails.
    pub fn compact(path: impl AsRef<Path>) -> Result<(u64, u64), OpenError> {
        upkeep::compact(path.as_ref())
    }

    /// The time of the newest event's append, if any.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails.
    pub fn last_append_time(&self) -> Result<Option<Timestamp>, StorageError> {
        self.sync_reads()?;
        let txn = redb::ReadableDatabase::begin_read(&self.handle.shared.db)?;
        let ns = commit::last_append_ns(&txn)?;
        Ok((ns != i64::MIN).then(|| crate::time::ts(ns)))
    }
}

impl Bus for DurableBus {
    fn publish(&self, event: Event) -> Result<Receipt, PublishError> {
        let mut receipts = commit::publish(&self.handle.shared, vec![event])?;
        Ok(receipts.remove(0))
    }

    fn subscribe_boxed(
        &self,
        filter: Filter,
        handler: Box<dyn Handler>,
    ) -> Result<Subscription, SubscribeError> {
        let shared = &self.handle.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(SubscribeError::Closed);
        }
        let id = shared.live.add(filter, handler);
        let owner: Arc<dyn Detach> = shared.live.clone();
        Ok(Subscription::new(id, Arc::downgrade(&owner)))
    }

    fn recent_events(&self, limit: usize, filter: &Filter) -> Result<Vec<Event>, ReadError> {
        if self.handle.shared.closed.load(Ordering::Acquire) {
            return Err(ReadError::Closed);
        }
        let (txn, snap) = read_tail::Snapshot::begin(&self.handle.shared)?;
        upkeep::recent(&txn, &snap, limit, filter)
    }

    fn close(&self) {
        self.handle.close();
    }
}
