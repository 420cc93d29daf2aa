//! Group commit, applying to redb, and ordered fan-out.
//!
//! Publishers queue prepared records (`PublishQueue`). Whoever holds the
//! commit state (`Core`, in `Shared::core`) takes every publish queued (up
//! to `max_group_events` events), gives them consecutive `seq`s and makes
//! them durable with one fsync: a frame of the write-ahead log (`wal`) when
//! the log was opened from a path, else a durable redb commit. This is the
//! group commit of database WALs; publishes queued while an fsync runs form
//! the next group.
//!
//! The committer is normally a publisher waiting for its own publish (a
//! leader, as in `RocksDB`'s write groups): `Pending::finish` commits the queue
//! itself when the core is free, which saves two thread hand-offs per group
//! (tens of µs each on a VM; +34% events/s at 16 publishers sharing a
//! thread, BENCHMARKS.md). Commit invariants:
//! - At most one committer at a time: the `core` lock. Every `seq`, WAL
//!   frame and id check happens under it.
//! - No publish waits forever: a publisher that finds the core taken
//!   registers in `PublishQueue::waiters` and then looks at the lock again;
//!   whoever releases the core calls `hand_off`, which wakes one registered
//!   publisher still waiting when publishes are queued. A publisher also
//!   looks again every `RECHECK`, and the writer thread commits any publish
//!   queued for `LINGER` (one submitted and not waited for).
//! - The writer thread also takes every request that is not a publish
//!   (acknowledgement flushes, dead letters, applies, shutdown), and at
//!   shutdown commits what is still queued before the applier's last apply.
//!
//! With a WAL, the applier thread later moves acknowledged groups into the
//! redb file in one durable commit per `apply_interval`, with the webhook
//! delivery records they create (`AppendHook`) and the subscriptions'
//! positions. `read`, `recent_events` and durable subscriptions' catch-up
//! read the groups it has not applied yet from memory (`read_tail`); the
//! other reads in this process (cursors, stats, check) wait for it
//! (`ensure_applied`).
//!
//! Fan-out invariants (`FanState`):
//! - A group enters `pending` only after it is durable (G1).
//! - Groups are dispatched in `seq` order: the group dispatched next is the
//!   one whose first `seq` equals `next_seq`.
//! - At most one thread dispatches at a time (`busy`, the baton), so each
//!   subscriber sees events in `seq` order. Dispatch runs with no lock held.
//! - `live_durable` (`LiveSubs`) changes only under the `fan` lock, and
//!   the dispatcher snapshots it under the same lock when it takes a
//!   group; a durable subscription switches to live only when it has
//!   handled everything before `next_seq`, so the switch has no gap and no
//!   duplicate.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::codec;
use super::event_blocks::EventTables;
use super::recent_ids::RecentIds;
use super::subscription::DurableSub;
use super::tables::{CURSORS, DEAD_LETTERS, id_key, to_bytes};
use super::wal::Wal;
use super::{Shared, upkeep};
use crate::bus::{HandlerFailure, Receipt};
use crate::error::{PublishError, StorageError};
use crate::event::Event;
use crate::fanout::dispatch_to;
use crate::id::EventId;
use crate::sync::{Condvar, Mutex, Nudger, OneshotSender, PoisonDart, Waited, Waker, oneshot};
use crate::time::now_ns;

mod applier;
mod by_tenant;
#[cfg(feature = "tokio")]
pub(crate) mod completion;
mod fanout;
mod gather;
mod live_subs;
mod publish;
mod pull_wakers;
mod replay;

use applier::{Applier, ApplyMsg, ApplyQueue, Unapplied};
use fanout::{DISPATCHING, fan_out};
pub(crate) use fanout::{FanState, Group};
#[cfg(feature = "tokio")]
pub(crate) use publish::submit_async;
pub(crate) use publish::{Pending, publish, submit};
pub(crate) use replay::recover;

/// A request to the writer thread.
pub(crate) enum WriteReq {
    /// Store acknowledged positions now; reply when durable.
    FlushAcks(Option<Sender<Result<(), String>>>),
    /// Store a dead letter and move the cursor past it; reply when durable.
    DeadLetter {
        name: String,
        seq: u64,
        record: Vec<u8>,
        reply: Sender<Result<(), String>>,
    },
    /// Apply everything acknowledged to the redb file; reply when done.
    Apply(Sender<Result<(), String>>),
    /// The publish queue was empty and is not: commit it if no waiting
    /// publisher does within `LINGER`.
    Kick,
    Shutdown,
}

pub(crate) struct PublishReq {
    items: Vec<Prepared>,
    /// Bytes its records take in a WAL frame (at most `max_batch_bytes`).
    bytes: usize,
    reply: Reply,
    /// When the writer thread commits it if no publisher has: `LINGER`
    /// after it was queued, or at once for an async publish.
    due: Instant,
}

/// Where a publish's outcome goes.
enum Reply {
    /// To a thread waiting in [`Pending`], which fans out its group.
    Blocking(OneshotSender<Result<Outcome, PublishError>>),
    /// To a future (`publish_async`): once its group is fanned out, by the
    /// completion thread (`completion`).
    #[cfg(feature = "tokio")]
    /// With when it was submitted.
    #[cfg(feature = "tokio")]
    Async(
        crate::sync::AsyncSender<Result<Vec<Receipt>, PublishError>>,
        Instant,
    ),
}

impl Reply {
    /// True if a publisher thread may commit this request itself.
    fn has_leader(&self) -> bool {
        match self {
            Reply::Blocking(_) => true,
            #[cfg(feature = "tokio")]
            Reply::Async(..) => false,
        }
    }

    /// True once a blocking publisher waits for it (see `reply_all`).
    fn is_awaited(&self) -> bool {
        match self {
            Reply::Blocking(r) => r.is_awaited(),
            #[cfg(feature = "tokio")]
            Reply::Async(..) => false,
        }
    }

    /// Answers with a failure.
    fn fail(self, err: PublishError) {
        match self {
            Reply::Blocking(r) => r.send(Err(err)),
            #[cfg(feature = "tokio")]
            Reply::Async(r, _) => r.send(Err(err)),
        }
    }

    /// Answers with the request's `seq`s: a blocking publisher is woken
    /// (or, with `defer`, filled and woken by the returned waker); an async
    /// one is completed now if nothing of it is fanned out, else after its
    /// group is.
    fn answer(self, shared: &Shared, outcome: Outcome, defer: bool) -> Option<Waker> {
        #[cfg(not(feature = "tokio"))]
        let _ = shared;
        match self {
            Reply::Blocking(r) if defer => Some(r.fill(Ok(outcome))),
            Reply::Blocking(r) => {
                r.send(Ok(outcome));
                None
            }
            #[cfg(feature = "tokio")]
            Reply::Async(r, submitted) => {
                match outcome.group {
                    None => {
                        crate::telemetry::published(submitted.elapsed());
                        r.send(Ok(publish::receipts(outcome.seqs, None)));
                    }
                    Some(group) => shared.completions.push(completion::Completion {
                        reply: r,
                        seqs: outcome.seqs,
                        group,
                        submitted,
                    }),
                }
                None
            }
        }
    }
}

/// Publishes waiting to be committed, and the publishers waiting for a
/// committer (see [`Pending`]).
#[derive(Default)]
pub(crate) struct PublishQueue {
    reqs: Vec<PublishReq>,
    waiters: std::collections::VecDeque<Nudger>,
    /// The writer thread is watching the queue (it wakes by itself at
    /// least every `LINGER` until `WATCH` passes with nothing queued):
    /// a submit need not wake it.
    writer_watching: bool,
    /// While a committer waits for the rest of its group (`gather`): the
    /// requests at which `enqueue` wakes it (`Shared::queue_grew`); 0
    /// when nobody waits.
    gather_until: usize,
}

/// How long a queued publish may wait for its own publisher (or another)
/// to commit it before the writer thread does. 1 ms, not 200 µs: with
/// `WATCH` it sets how often a watching writer thread wakes, and waking
/// it once per group cost 8% of the process's CPU at 64 publishers on one
/// thread (BENCHMARKS.md).
const LINGER: Duration = Duration::from_millis(1);
/// How long the writer thread goes on watching an empty queue before it
/// sleeps until woken.
const WATCH: Duration = Duration::from_millis(20);
/// How long a publisher waiting for a committer sleeps before looking again
/// (a hand-off normally wakes it sooner).
const RECHECK: Duration = Duration::from_millis(1);

struct Prepared {
    event: Event,
    record: Vec<u8>,
}

/// Where a publisher waits for its [`Outcome`].
type ReplyReceiver = crate::sync::OneshotReceiver<Result<Outcome, PublishError>>;

/// The `seq` the committer gave one event of a request.
#[derive(Debug, Clone, Copy)]
struct Assigned {
    id: EventId,
    seq: u64,
    /// Already in the log (idempotency by id): `seq` is the original one
    /// and nothing was written.
    duplicate: bool,
}

/// What the committer tells one publisher.
struct Outcome {
    /// Per event of the request, in order.
    seqs: Vec<Assigned>,
    group: Option<Arc<Group>>,
    /// The other publishers of this group, for this one to wake (see
    /// `reply_all`).
    wake: Vec<Waker>,
}

/// The newest append time in the log, or `i64::MIN` for an empty log.
pub(crate) fn last_append_ns(txn: &redb::ReadTransaction) -> Result<i64, StorageError> {
    super::event_blocks::last_append_ns(&EventTables::read(txn)?)
}

/// Where acknowledged groups go to reach the redb file.
enum ApplyTarget {
    /// Without a WAL: applied on the writer thread before acknowledging.
    Inline(Applier),
    /// With a WAL: the applier thread.
    Thread(
        ApplyQueue,
        Sender<ApplyMsg>,
        Option<std::thread::JoinHandle<()>>,
    ),
}

/// The commit state, held by one committer at a time (`Shared::core`).
///
/// With a WAL (a log opened from a path), a group is acknowledged once its
/// records are in the WAL and fsync'd, and handed to the applier thread,
/// which applies the accumulated groups to redb in one durable commit every
/// `apply_interval` (or sooner when a reader needs them, when
/// acknowledgements or dead letters must be stored, or when many events
/// wait). Committers meanwhile go on appending to the WAL, so redb's commit
/// cost is off the publish path. Without a WAL each group is applied,
/// durably, by its committer before it is acknowledged.
pub(crate) struct Core {
    shared: Arc<Shared>,
    wal: Option<Wal>,
    last_append: i64,
    /// Ids of acknowledged events that may not be in the redb file yet, for
    /// idempotency by id; entries at or below `applied_seq` are pruned.
    unapplied_ids: RecentIds,
    /// Every id in the log (file or WAL) is at most this (as `id_key`).
    max_id: u128,
    apply: ApplyTarget,
    /// How many requests the next group may wait for (`gather`).
    gather: gather::Gather,
}

/// Most bytes of encoded events in one `publish_batch`, and in one group
/// commit: each is one write-ahead-log frame, whose length is a `u32`.
pub const MAX_BATCH_BYTES: usize = 256 << 20;

/// WAL bytes after which the WAL restarts, carrying the frames not yet
/// applied (`wal`).
pub(crate) const WAL_RESTART_BYTES: u64 = 16 << 20;
/// Unapplied events after which the applier applies at once. 5,000, not
/// 20,000: with the 16 MiB cache it keeps peak memory lower at 64
/// publishers at no cost in throughput (BENCHMARKS.md, "Memory").
const MAX_UNAPPLIED: usize = 5_000;
/// Bytes of unapplied records after which the writer waits for the
/// applier: what bounds the memory of acknowledged, unapplied events when
/// they are large (1 MiB payloads would otherwise pile up to
/// the WAL's size twice over: records, and events kept for fan-out).
///
/// 2 MiB, not 8: the events kept for the append hooks (while a webhook is
/// active; else only the records are held, `Unapplied`) take about three
/// times their records, and at 8 MiB a stalled apply (the file growing, a slow
/// fsync) let a long publisher's peak RSS climb with the log (80 MiB at 1M
/// events); at 2 MiB, with `SOFT_UNAPPLIED_BYTES`, it stays at 50-53 MiB
/// from 100k to 3M events, for 4% fewer events/s (BENCHMARKS.md, "Memory").
const MAX_UNAPPLIED_BYTES: u64 = 2 << 20;
/// Bytes of unapplied records after which the writer asks the applier to
/// apply at once, without waiting for it: so that it rarely has to wait at
/// `MAX_UNAPPLIED_BYTES`.
const SOFT_UNAPPLIED_BYTES: u64 = 1 << 20;

/// The largest event id in the file (0 when empty).
fn max_id_in_file(shared: &Shared) -> Result<u128, StorageError> {
    let txn = redb::ReadableDatabase::begin_read(&shared.db)?;
    super::id_index::max_id(&txn)
}

impl Core {
    pub(crate) fn new(shared: Arc<Shared>, wal: Option<Wal>, last_append: i64) -> Core {
        let applier = Applier::new(shared.clone(), wal.is_some());
        let apply = if wal.is_some() {
            let (tx, rx) = crossbeam_channel::unbounded();
            let queue: ApplyQueue = Arc::default();
            let q = queue.clone();
            let handle = std::thread::Builder::new()
                .name("ctrlbus-apply".into())
                .spawn(move || applier.run(rx, q))
                .ok();
            match handle {
                Some(h) => ApplyTarget::Thread(queue, tx, Some(h)),
                None => ApplyTarget::Inline(Applier::new(shared.clone(), true)),
            }
        } else {
            ApplyTarget::Inline(applier)
        };
        // The largest id in the file (the WAL, if any, was replayed into it).
        // If it can't be read, every publish looks its id up in the index:
        // skipping the duplicate check would accept an id twice.
        let max_id = max_id_in_file(&shared).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the largest event id; checking every id");
            u128::MAX
        });
        Core {
            shared,
            wal,
            last_append,
            max_id,
            unapplied_ids: RecentIds::default(),
            apply,
            gather: gather::Gather::default(),
        }
    }

    /// How long the writer thread may wait for a request before an
    /// inline applier (no WAL) is due.
    fn timeout(&self) -> Duration {
        match &self.apply {
            ApplyTarget::Inline(a) => a.timeout(),
            ApplyTarget::Thread(..) => Duration::from_secs(3600),
        }
    }

    /// No request came within `timeout`: timed applies of an inline applier.
    fn idle(&mut self) {
        if let ApplyTarget::Inline(a) = &mut self.apply {
            a.tick(Vec::new(), false);
        }
    }

    /// Commits the queued publishes (up to `max_group_events` events) as
    /// one group.
    pub(crate) fn commit_queued(&mut self) {
        let max = self.shared.opts.max_group_events;
        let max_bytes = self.shared.opts.max_batch_bytes;
        let publishes = {
            let mut q = self.shared.queue.lock();
            self.gather_rest(&mut q, max);
            let (mut count, mut bytes) = (0, 0);
            // A group is one WAL frame: bounded in events and in bytes (so
            // its u32 length can't overflow; one request always fits).
            let n = q
                .reqs
                .iter()
                .position(|r| {
                    count += r.items.len();
                    bytes += r.bytes;
                    count > max || bytes > max_bytes
                })
                .unwrap_or(q.reqs.len())
                .max(1)
                .min(q.reqs.len());
            q.reqs.drain(..n).collect::<Vec<_>>()
        };
        if !publishes.is_empty() {
            self.append(publishes);
        }
    }

    /// Waits, within the bounds `gather` sets, for the publishers the last
    /// group expects to join this one (none without fsyncs, or once
    /// closing: nobody more will come).
    fn gather_rest(&self, q: &mut crate::sync::MutexGuard<'_, PublishQueue>, max: usize) {
        let shared = &self.shared;
        if !shared.opts.sync || shared.closed.load(Ordering::Acquire) {
            return;
        }
        let Some((target, patience)) = self.gather.wait_for(q.reqs.len(), max) else {
            return;
        };
        // Already a whole group of events (a large `publish_batch`): more
        // requests wouldn't fit in it.
        if q.reqs.iter().map(|r| r.items.len()).sum::<usize>() >= max {
            return;
        }
        let deadline = Instant::now() + patience;
        q.gather_until = target;
        while q.reqs.len() < target {
            if shared.queue_grew.wait_until(q, deadline).timed_out() {
                break;
            }
        }
        q.gather_until = 0;
        crate::telemetry::group_waited(q.reqs.len() >= target);
    }

    /// Takes `first` and every request waiting behind it and hands them to
    /// the applier (or applies them, without an applier thread). True if
    /// it took `Shutdown`, which ends the batch.
    fn process(&mut self, first: WriteReq, rx: &Receiver<WriteReq>) -> bool {
        let mut others = Vec::new();
        let mut shutdown = false;
        let mut next = Some(first);
        while let Some(req) = next.take() {
            match req {
                WriteReq::Kick => {}
                WriteReq::Shutdown => shutdown = true,
                other => others.push(other),
            }
            if !shutdown {
                next = rx.try_recv().ok();
            }
        }
        match &mut self.apply {
            ApplyTarget::Inline(a) => a.tick(others, shutdown),
            ApplyTarget::Thread(_, tx, _) => {
                for req in others {
                    if let Err(e) = tx.send(ApplyMsg::Now(req))
                        && let ApplyMsg::Now(req) = e.0
                    {
                        refuse(req);
                    }
                }
            }
        }
        shutdown
    }

    /// Stops the applier after its last apply, refuses what is still
    /// queued, and trims the WAL once everything is in the redb file.
    fn shut_down(mut self, rx: &Receiver<WriteReq>) {
        if let ApplyTarget::Thread(_, tx, handle) = &mut self.apply {
            let _ = tx.send(ApplyMsg::Shutdown);
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
        while let Ok(req) = rx.try_recv() {
            refuse(req);
        }
        refuse_queued(&self.shared);
        // Everything is durable in the redb file (with a WAL, the applier's
        // commits always are: `txn`): the WAL's frames are no longer
        // needed, nor most of its space.
        let shared = &self.shared;
        if let Some(wal) = &mut self.wal
            && !shared.poisoned.load(Ordering::Acquire)
            && shared.applied_seq.load(Ordering::Acquire) >= shared.last_seq.load(Ordering::Acquire)
        {
            // The file holds every event: record the WAL clean, then give
            // its space back. A crash between the two leaves frames the
            // file already has, which the next open skips.
            let clean = super::recovery::WalState {
                in_use: false,
                generation: wal.generation() + 1,
            };
            if let Err(e) = super::recovery::write_state(shared, clean) {
                tracing::warn!(error = %e, "cannot record the write-ahead log clean on close");
            } else if let Err(e) = wal.trim() {
                tracing::warn!(error = %e, "cannot trim the write-ahead log on close");
            }
        }
    }

    /// Ends the WAL's carry once what it carries is applied, and restarts
    /// the WAL once it holds `wal_restart_bytes`: a plain new generation
    /// when everything is applied, else one carrying the unapplied frames
    /// (never a wait for the applier here). False when that failed: the
    /// bus is poisoned, and the group must fail too (its frame would be of
    /// a generation the header on disk may not name).
    fn maybe_restart_wal(&mut self) -> bool {
        let Some(wal) = &mut self.wal else {
            return true;
        };
        let shared = &self.shared;
        let applied = shared.applied_seq.load(Ordering::Acquire);
        let result = (|| -> std::io::Result<()> {
            wal.release_carry(applied)?;
            if wal.used() < shared.opts.wal_restart_bytes || wal.carrying() {
                return Ok(());
            }
            if !wal.restart_carrying(applied)? {
                // Everything was applied: no id waits in memory either.
                self.unapplied_ids.clear();
            }
            Ok(())
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot restart the write-ahead log");
            shared.poisoned.store(true, Ordering::Release);
            return false;
        }
        true
    }

    /// Before the frame of `records` if it would reach the frames the WAL
    /// carries: waits for the applier, then ends the carry. If the apply
    /// failed the carry stays, and the WAL refuses the frame. (The frame's
    /// length is worked out only while carrying.)
    fn make_room_in_wal(&mut self, records: &[Vec<u8>]) {
        let blocked = self.wal.as_ref().is_some_and(|w| {
            w.carrying() && w.carry_blocks(Wal::frame_len(records.iter().map(Vec::len)))
        });
        if !blocked {
            return;
        }
        self.wait_for_applier();
        let applied = self.shared.applied_seq.load(Ordering::Acquire);
        if let Some(wal) = &mut self.wal
            && let Err(e) = wal.release_carry(applied)
        {
            tracing::error!(error = %e, "cannot end the write-ahead log's carry");
            self.shared.poisoned.store(true, Ordering::Release);
        }
    }

    /// Asks the applier thread to apply everything now, and waits for it.
    fn wait_for_applier(&self) {
        if let ApplyTarget::Thread(_, tx, _) = &self.apply {
            let (reply, rx) = crossbeam_channel::bounded(1);
            if tx.send(ApplyMsg::Now(WriteReq::Apply(reply))).is_ok() {
                let _ = rx.recv();
            }
        }
    }

    /// Assigns `seq`s to a group of publishes and makes them durable: in the
    /// WAL (then acknowledges; the applier applies it later), or without a
    /// WAL by applying it to redb at once. Answers every request.
    fn append(&mut self, mut publishes: Vec<PublishReq>) {
        let shared = self.shared.clone();
        let _span = tracing::debug_span!("commit", publishes = publishes.len()).entered();
        if shared.poisoned.load(Ordering::Acquire) {
            fail_all(publishes, Vec::new(), || StorageError::Poisoned);
            return;
        }
        if shared.unapplied_bytes.load(Ordering::Acquire) >= MAX_UNAPPLIED_BYTES {
            self.wait_for_applier();
        }
        if !self.maybe_restart_wal() {
            fail_all(publishes, Vec::new(), || StorageError::Poisoned);
            return;
        }
        let start_seq = shared.last_seq.load(Ordering::Acquire) + 1;
        let append_ns = now_ns().max(self.last_append);
        // Idempotency: ids already applied (redb) or waiting (in memory).
        // The read transaction begins before the pruning below, so an id
        // pruned from memory is visible to it.
        let mut outcomes: Vec<Vec<Assigned>> = Vec::with_capacity(publishes.len());
        // This group's new ids so far (for a second publish of one), in
        // `seq` order: the group's ids for the id index after.
        let mut fresh = RecentIds::with_capacity(publishes.iter().map(|r| r.items.len()).sum());
        let lookup = (|| -> Result<(), StorageError> {
            self.unapplied_ids
                .prune(shared.applied_seq.load(Ordering::Acquire));
            // Opened only for an id not above every id in the log: ids made
            // by this process's generator only grow, so fresh events skip
            // the index entirely. A table opened after the pruning above
            // sees every pruned (applied) id.
            let mut by_id: Option<redb::ReadTransaction> = None;
            let mut next = start_seq;
            for req in &mut publishes {
                let mut seqs = Vec::with_capacity(req.items.len());
                for item in &mut req.items {
                    let key = id_key(item.event.id.to_bytes());
                    let known = if key > self.max_id {
                        None
                    } else if let Some(s) = self.unapplied_ids.get(key).or_else(|| fresh.get(key)) {
                        Some(s)
                    } else {
                        if by_id.is_none() {
                            by_id = Some(redb::ReadableDatabase::begin_read(&shared.db)?);
                        }
                        match &by_id {
                            Some(txn) => super::id_index::find_in(txn, key)?,
                            None => None,
                        }
                    };
                    if let Some(seq) = known {
                        seqs.push(Assigned {
                            id: item.event.id,
                            seq,
                            duplicate: true,
                        });
                        continue;
                    }
                    item.record[1..9].copy_from_slice(&append_ns.to_be_bytes());
                    self.max_id = self.max_id.max(key);
                    fresh.insert(key, next);
                    seqs.push(Assigned {
                        id: item.event.id,
                        seq: next,
                        duplicate: false,
                    });
                    next += 1;
                }
                outcomes.push(seqs);
            }
            Ok(())
        })();
        if let Err(e) = lookup {
            let reason = e.to_string();
            fail_all(publishes, Vec::new(), || StorageError::CommitFailed {
                reason: reason.clone(),
            });
            return;
        }
        let mut group_events: Vec<(u64, Event)> = Vec::new();
        let mut records: Vec<Vec<u8>> = Vec::new();
        for (req, seqs) in publishes.iter_mut().zip(&outcomes) {
            for (item, a) in req.items.drain(..).zip(seqs) {
                if !a.duplicate {
                    group_events.push((a.seq, item.event));
                    records.push(item.record);
                }
            }
        }
        let Some(&(last, _)) = group_events.last() else {
            // Only duplicates: nothing to write.
            reply_all(&shared, publishes, outcomes, None);
            return;
        };
        let durable_since = Instant::now();
        self.make_room_in_wal(&records);
        if let Some(wal) = &mut self.wal
            && let Err(e) = wal.append(start_seq, records.iter().map(|r| r.as_slice()))
        {
            tracing::error!(error = %e, "write-ahead log append failed; the log refuses writes until reopened");
            // After a failed fsync the page cache cannot be trusted.
            shared.poisoned.store(true, Ordering::Release);
            let reason = e.to_string();
            fail_all(publishes, Vec::new(), || StorageError::CommitFailed {
                reason: reason.clone(),
            });
            return;
        }
        let group = Arc::new(Group {
            last,
            events: group_events,
            failures: Mutex::new(Vec::new()),
            done: Mutex::new(false),
            done_cv: Condvar::new(),
        });
        let unapplied = Unapplied {
            first: start_seq,
            last,
            ids: fresh.into_ids(),
            group: shared
                .hooks
                .read()
                .iter()
                .any(|h| h.may_want_events())
                .then(|| group.clone()),
            bytes: records.iter().map(|r| r.len() as u64).sum(),
            records: Arc::new(records),
            append_ns,
            acked_at: Instant::now(),
        };
        debug_assert_eq!(unapplied.ids.len(), group.events.len());
        self.last_append = append_ns;
        match &mut self.apply {
            ApplyTarget::Inline(a) => {
                a.push(unapplied);
                if !a.apply(Vec::new()) {
                    // Not durable: nobody may see it.
                    fail_all(publishes, Vec::new(), || StorageError::CommitFailed {
                        reason: "the commit of this group failed (logged)".into(),
                    });
                    return;
                }
            }
            ApplyTarget::Thread(queue, tx, _) => {
                for (seq, id) in (unapplied.first..).zip(&unapplied.ids) {
                    self.unapplied_ids.insert(*id, seq);
                }
                // For reads, before the applier has it (`read_tail`).
                shared
                    .tail
                    .lock()
                    .push(unapplied.first, unapplied.records.clone());
                let bytes = unapplied.bytes;
                let before = shared.unapplied_bytes.fetch_add(bytes, Ordering::AcqRel);
                queue.lock().push(unapplied);
                if before < SOFT_UNAPPLIED_BYTES && before + bytes >= SOFT_UNAPPLIED_BYTES {
                    let _ = tx.send(ApplyMsg::Soon);
                }
            }
        }
        // Who may join the next group: this one's publishers, answered
        // below, and those that queued while it was made durable.
        let arrived = shared.queue.lock().reqs.len();
        self.gather
            .committed(publishes.len(), arrived, durable_since.elapsed());
        shared.last_seq.store(last, Ordering::Release);
        crate::telemetry::committed(group.events.len());
        crate::telemetry::apply_lag(
            last.saturating_sub(shared.applied_seq.load(Ordering::Acquire)),
        );
        tracing::debug!(first_seq = start_seq, last_seq = last, "group committed");
        shared.fan.lock().pending.insert(start_seq, group.clone());
        reply_all(&shared, publishes, outcomes, Some(group));
    }
}

/// The writer thread: takes the requests that are not publishes, runs an
/// inline applier's timed applies, commits queued publishes that no
/// publisher committed within `LINGER` (a publish submitted and not yet
/// waited for), and shuts down.
pub(crate) fn run_writer(shared: Arc<Shared>, rx: Receiver<WriteReq>) {
    let _dart = PoisonDart::new(&shared.poisoned, "ctrlbus-writer");
    // Without the applier thread (no WAL) this thread runs the timed
    // applies and acknowledgement flushes: wake at least this often.
    let (tick, inline) = match shared.core.lock().as_ref() {
        Some(core) => (core.timeout(), matches!(core.apply, ApplyTarget::Inline(_))),
        None => return,
    };
    let mut last_seen = Instant::now();
    loop {
        let mut timeout = tick;
        let soonest = {
            let mut q = shared.queue.lock();
            let soonest = q.reqs.iter().map(|r| r.due).min();
            if soonest.is_some() {
                last_seen = Instant::now();
            } else if q.writer_watching {
                // Under the queue's lock, as `enqueue` reads it: a submit
                // after this wakes the thread.
                let watched = last_seen.elapsed();
                if watched >= WATCH {
                    q.writer_watching = false;
                } else {
                    timeout = timeout.min(LINGER).min(WATCH.saturating_sub(watched));
                }
            }
            soonest
        };
        if let Some(t) = soonest {
            let due = t.saturating_duration_since(Instant::now());
            if due.is_zero() {
                with_core(&shared, Core::commit_queued);
                continue;
            }
            timeout = timeout.min(due);
        }
        let first = match rx.recv_timeout(timeout) {
            Ok(WriteReq::Kick) => {
                last_seen = Instant::now();
                continue;
            }
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                // Only an inline applier has timed work; a watching wake
                // must not queue for the core behind a committer's fsync.
                if inline {
                    with_core(&shared, Core::idle);
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut guard = shared.core.lock();
        let Some(core) = guard.as_mut() else {
            refuse(first);
            break;
        };
        let shutdown = core.process(first, &rx);
        if shutdown {
            // Taking the core out ends the `Shared` → `Core` → `Shared`
            // cycle; publishers then refuse what is queued.
            let core = guard.take();
            drop(guard);
            if let Some(mut core) = core {
                // Publishes submitted before the close are committed, as if
                // their publishers had waited for them.
                while !shared.queue.lock().reqs.is_empty() {
                    core.commit_queued();
                }
                core.shut_down(&rx);
            }
            hand_off(&shared);
            break;
        }
        drop(guard);
        hand_off(&shared);
    }
}

/// Runs `f` on the core (if not shut down), then hands the queue on: a
/// publisher that found the core taken sleeps until someone does.
fn with_core(shared: &Shared, f: impl FnOnce(&mut Core)) {
    if let Some(core) = shared.core.lock().as_mut() {
        f(core);
    }
    hand_off(shared);
}

/// After a commit: if publishes are queued, wakes one registered publisher
/// still waiting, to commit them. Registrations of publishers already
/// answered are dropped on the way.
fn hand_off(shared: &Shared) {
    let mut q = shared.queue.lock();
    if q.reqs.is_empty() {
        q.waiters.clear();
        return;
    }
    while let Some(w) = q.waiters.pop_front() {
        if w.nudge() {
            return;
        }
    }
}

/// Refuses every queued publish (the bus is shut down).
fn refuse_queued(shared: &Shared) {
    let reqs = std::mem::take(&mut shared.queue.lock().reqs);
    for req in reqs {
        req.reply.fail(PublishError::Closed);
    }
}

/// Answers every publish of a group. Waking a parked publisher is a system
/// call, so the committer wakes one publisher, which wakes the others: the
/// first whose publisher is already waiting for it. A publish submitted and
/// not yet waited for is passed over, so the others never wait for its
/// publisher to call `wait`. If nobody waits yet, each is simply answered.
fn reply_all(
    shared: &Shared,
    publishes: Vec<PublishReq>,
    outcomes: Vec<Vec<Assigned>>,
    group: Option<Arc<Group>>,
) {
    let outcome = |seqs: Vec<Assigned>, wake| {
        let has_new = seqs.iter().any(|s| !s.duplicate);
        Outcome {
            seqs,
            group: if has_new { group.clone() } else { None },
            wake,
        }
    };
    let mut replies: Vec<_> = publishes.into_iter().zip(outcomes).collect();
    let Some(delegate) = replies.iter().position(|(r, _)| r.reply.is_awaited()) else {
        for (req, seqs) in replies {
            req.reply.answer(shared, outcome(seqs, Vec::new()), false);
        }
        return;
    };
    let (req, seqs) = replies.remove(delegate);
    let wakers = replies
        .into_iter()
        .filter_map(|(r, seqs)| r.reply.answer(shared, outcome(seqs, Vec::new()), true))
        .collect();
    req.reply.answer(shared, outcome(seqs, wakers), false);
}

fn refuse(req: WriteReq) {
    match req {
        WriteReq::FlushAcks(Some(r))
        | WriteReq::DeadLetter { reply: r, .. }
        | WriteReq::Apply(r) => {
            let _ = r.send(Err("the bus is closed".into()));
        }
        _ => {}
    }
}

fn fail_all(publishes: Vec<PublishReq>, others: Vec<WriteReq>, err: impl Fn() -> StorageError) {
    for req in publishes {
        req.reply.fail(PublishError::Storage(err()));
    }
    for req in others {
        match req {
            WriteReq::FlushAcks(Some(r))
            | WriteReq::DeadLetter { reply: r, .. }
            | WriteReq::Apply(r) => {
                let _ = r.send(Err(err().to_string()));
            }
            _ => {}
        }
    }
}

/// Waits until every event up to `seq` is in the redb file (so that a read
/// transaction sees it): read-your-writes for cursors, stats, `check` and
/// retention (`read`, `recent_events` and catch-up read the unapplied
/// groups from memory instead, `read_tail`).
pub(crate) fn ensure_applied(shared: &Shared, seq: u64) -> Result<(), String> {
    if shared.applied_seq.load(Ordering::Acquire) >= seq {
        return Ok(());
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    shared
        .tx
        .send(WriteReq::Apply(tx))
        .map_err(|_| "the bus is closed".to_string())?;
    rx.recv_timeout(Duration::from_secs(60))
        .map_err(|_| "the writer did not answer".to_string())?
}

/// Asks the writer to store acknowledged positions and waits until it has.
pub(crate) fn flush_acks(shared: &Shared, timeout: Duration) -> Result<(), String> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    shared
        .tx
        .send(WriteReq::FlushAcks(Some(tx)))
        .map_err(|_| "the bus is closed".to_string())?;
    rx.recv_timeout(timeout)
        .map_err(|_| "the writer did not answer".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group of three publishes answered by `reply_all`; the receivers,
    /// in queue order.
    fn group_of_three(awaited: &[usize]) -> Vec<ReplyReceiver> {
        let mut reqs = Vec::new();
        let mut rxs = Vec::new();
        for i in 0..3 {
            let (reply, rx) = oneshot();
            if awaited.contains(&i) {
                rx.awaiting();
            }
            reqs.push(PublishReq {
                items: Vec::new(),
                bytes: 0,
                reply: Reply::Blocking(reply),
                due: Instant::now(),
            });
            rxs.push(rx);
        }
        let outcomes = (1..=3)
            .map(|seq| {
                vec![Assigned {
                    id: EventId::new(),
                    seq,
                    duplicate: false,
                }]
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let bus = crate::DurableBus::open(dir.path().join("t.redb")).unwrap();
        reply_all(bus.shared(), reqs, outcomes, None);
        rxs
    }

    /// How many others each receiver was given to wake.
    fn wakers_handed_out(rxs: Vec<ReplyReceiver>) -> Vec<usize> {
        rxs.into_iter()
            .map(|mut rx| match rx.try_take() {
                Some(Some(Ok(mut outcome))) => {
                    let n = outcome.wake.len();
                    outcome.wake.clear(); // (dropping a waker wakes)
                    n
                }
                _ => panic!("every publish of the group is answered"),
            })
            .collect()
    }

    #[test]
    fn the_others_are_woken_by_a_publisher_that_waits() {
        // The first publisher submitted and has not called `wait`: handing
        // it the others would leave them asleep until it does.
        assert_eq!(wakers_handed_out(group_of_three(&[1, 2])), [0, 2, 0]);
        assert_eq!(wakers_handed_out(group_of_three(&[0, 1, 2])), [2, 0, 0]);
        assert_eq!(wakers_handed_out(group_of_three(&[2])), [0, 0, 2]);
        // Nobody waits yet: each is answered directly.
        assert_eq!(wakers_handed_out(group_of_three(&[])), [0, 0, 0]);
    }
}
