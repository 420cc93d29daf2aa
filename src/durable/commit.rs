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
//! leader, as in RocksDB's write groups): `Pending::finish` commits the queue
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
//! positions; reads in this process wait for it (`ensure_applied`).
//!
//! Fan-out invariants (`FanState`):
//! - A group enters `pending` only after it is durable (G1).
//! - Groups are dispatched in `seq` order: the group dispatched next is the
//!   one whose first `seq` equals `next_seq`.
//! - At most one thread dispatches at a time (`busy`, the baton), so each
//!   subscriber sees events in `seq` order. Dispatch runs with no lock held.
//! - `live_durable` changes only under the `fan` lock, and the dispatcher
//!   snapshots it under the same lock when it takes a group; a durable
//!   subscription switches to live only when it has handled everything
//!   before `next_seq`, so the switch has no gap and no duplicate.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use redb::ReadableTable;

use super::codec;
use super::recent_ids::{IdHasher, RecentIds};
use super::subscription::DurableSub;
use super::tables::{BY_ID, CURSORS, DEAD_LETTERS, EVENTS, id_key, to_bytes};
use super::wal::Wal;
use super::{Shared, upkeep};
use crate::bus::{HandlerFailure, Receipt};
use crate::error::{PublishError, StorageError};
use crate::event::Event;
use crate::fanout::dispatch_to;
use crate::id::EventId;
use crate::sync::{Condvar, Mutex, Nudger, OneshotSender, PoisonDart, Waited, Waker, oneshot};
use crate::time::now_ns;

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
    reply: OneshotSender<Result<Outcome, PublishError>>,
    /// When it was queued (the writer thread commits it after `LINGER`).
    queued: Instant,
}

/// Publishes waiting to be committed, and the publishers waiting for a
/// committer (see [`Pending`]).
#[derive(Default)]
pub(crate) struct PublishQueue {
    reqs: Vec<PublishReq>,
    waiters: std::collections::VecDeque<Nudger>,
}

/// How long a queued publish may wait for its own publisher (or another)
/// to commit it before the writer thread does.
const LINGER: Duration = Duration::from_micros(200);
/// How long a publisher waiting for a committer sleeps before looking again
/// (a hand-off normally wakes it sooner).
const RECHECK: Duration = Duration::from_millis(1);

struct Prepared {
    event: Event,
    record: Vec<u8>,
}

/// Where a publisher waits for its [`Outcome`].
type ReplyReceiver = crate::sync::OneshotReceiver<Result<Outcome, PublishError>>;

/// What the committer tells one publisher.
struct Outcome {
    /// Per event of the request: its `seq` and whether it was a duplicate.
    seqs: Vec<(EventId, u64, bool)>,
    group: Option<Arc<Group>>,
    /// The other publishers of this group, for this one to wake (see
    /// `reply_all`).
    wake: Vec<Waker>,
}

/// Events committed together, waiting for or undergoing fan-out.
pub(crate) struct Group {
    last: u64,
    events: Vec<(u64, Event)>,
    failures: Mutex<Vec<(u64, HandlerFailure)>>,
    done: Mutex<bool>,
    done_cv: Condvar,
}

impl Group {
    fn wait(&self) {
        let mut done = self.done.lock();
        while !*done {
            self.done_cv.wait(&mut done);
        }
    }
}

pub(crate) struct FanState {
    /// First `seq` not yet taken for dispatch.
    pub(crate) next_seq: u64,
    pending: BTreeMap<u64, Arc<Group>>,
    busy: bool,
    /// Durable subscriptions in live mode.
    pub(crate) live_durable: Vec<Arc<DurableSub>>,
}

impl FanState {
    pub(crate) fn new(next_seq: u64) -> FanState {
        FanState {
            next_seq,
            pending: BTreeMap::new(),
            busy: false,
            live_durable: Vec::new(),
        }
    }
}

thread_local! {
    /// True while this thread holds the fan-out baton (runs handlers).
    static DISPATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Publishes events: validate and encode here, commit (on this thread when
/// the core is free), fan out in order, return receipts.
pub(crate) fn publish(
    shared: &Arc<Shared>,
    events: Vec<Event>,
) -> Result<Vec<Receipt>, PublishError> {
    if events.is_empty() {
        return if shared.closed.load(Ordering::Acquire) {
            Err(PublishError::Closed)
        } else {
            Ok(Vec::new())
        };
    }
    submit(shared, events)?.wait()
}

/// A publish handed to the writer, not yet waited for.
///
/// Invariant: `rx` is `Some` until `wait` takes it; dropping an unwaited
/// publish waits for it (so its group is fanned out in order).
pub(crate) struct Pending {
    shared: Arc<Shared>,
    rx: Option<ReplyReceiver>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.rx.is_some() {
            let _ = self.finish();
        }
    }
}

impl Pending {
    /// Waits until the events are durable and fanned out.
    pub(crate) fn wait(mut self) -> Result<Vec<Receipt>, PublishError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<Vec<Receipt>, PublishError> {
        let mut rx = self.rx.take().ok_or(PublishError::Closed)?;
        rx.awaiting();
        let shared = &self.shared;
        // Commit on this thread when nobody else is committing: the waiting
        // publisher leads the group commit of everything queued (as in
        // RocksDB's write groups), which saves waking a writer thread and
        // being woken back, two hand-offs of tens of µs each on a VM. When
        // someone else commits, register and sleep: the committer hands the
        // queue to one registered publisher when it is done (`hand_off`).
        let reply = loop {
            if let Some(reply) = rx.try_take() {
                break reply;
            }
            if let Some(mut guard) = shared.core.try_lock() {
                match guard.as_mut() {
                    Some(core) => core.commit_queued(),
                    // Shut down: what is still queued is refused.
                    None => refuse_queued(shared),
                }
                drop(guard);
                hand_off(shared);
                continue;
            }
            shared.queue.lock().waiters.push_back(rx.nudger());
            // The committer may have finished before seeing the registration.
            if !shared.core.is_locked() {
                continue;
            }
            match rx.wait_for(RECHECK) {
                Waited::Done(reply) => break reply,
                Waited::Woken => continue,
            }
        };
        let mut outcome = reply.ok_or(PublishError::Closed)??;
        for w in outcome.wake.drain(..) {
            w.wake();
        }
        let mut failures: Vec<(u64, HandlerFailure)> = Vec::new();
        if let Some(group) = &outcome.group {
            fan_out(shared);
            if !DISPATCHING.get() {
                group.wait();
                let all = group.failures.lock();
                if !all.is_empty() {
                    let mine: HashSet<u64> =
                        outcome.seqs.iter().filter(|s| !s.2).map(|s| s.1).collect();
                    failures = all
                        .iter()
                        .filter(|(s, _)| mine.contains(s))
                        .cloned()
                        .collect();
                }
            }
        }
        Ok(outcome
            .seqs
            .into_iter()
            .map(|(id, seq, duplicate)| Receipt {
                seq,
                id,
                duplicate,
                handler_failures: failures
                    .iter()
                    .filter(|(s, _)| *s == seq)
                    .map(|(_, f)| f.clone())
                    .collect(),
            })
            .collect())
    }
}

/// Validates and encodes events on the caller's thread and hands them to the
/// writer; the returned [`Pending`] waits for the outcome.
pub(crate) fn submit(shared: &Arc<Shared>, events: Vec<Event>) -> Result<Pending, PublishError> {
    if shared.closed.load(Ordering::Acquire) {
        return Err(PublishError::Closed);
    }
    if events.len() > 1 {
        let mut seen = HashSet::with_capacity(events.len());
        for e in &events {
            if !seen.insert(e.id) {
                return Err(PublishError::DuplicateInBatch(e.id));
            }
        }
    }
    let mut items = Vec::with_capacity(events.len());
    let mut bytes = 0usize;
    for event in events {
        event.validate_but_size()?;
        let payload = if event.payload.is_empty() {
            Vec::new()
        } else {
            let p = event.payload_json();
            if p.len() > shared.opts.max_payload_bytes {
                return Err(PublishError::Invalid(crate::EventError::PayloadTooLarge {
                    limit: shared.opts.max_payload_bytes,
                }));
            }
            p
        };
        let mut record = Vec::with_capacity(64 + payload.len() + event.tenant_id.len());
        codec::encode(&event, 0, &payload, &mut record);
        bytes += record.len() + 4;
        items.push(Prepared { event, record });
    }
    if bytes > shared.opts.max_batch_bytes {
        return Err(PublishError::BatchTooLarge {
            limit: shared.opts.max_batch_bytes,
            size: bytes,
        });
    }
    let (reply, rx) = oneshot();
    let req = PublishReq {
        items,
        bytes,
        reply,
        queued: Instant::now(),
    };
    let was_empty = {
        let mut q = shared.queue.lock();
        q.reqs.push(req);
        q.reqs.len() == 1
    };
    if was_empty {
        // The writer thread is the committer of last resort.
        let _ = shared.tx.send(WriteReq::Kick);
    }
    Ok(Pending {
        shared: shared.clone(),
        rx: Some(rx),
    })
}

/// Takes the baton if nobody holds it and dispatches every ready group in
/// order. A re-entrant publish (from inside a handler) returns at once: its
/// group is dispatched by the loop that is already running.
fn fan_out(shared: &Shared) {
    if DISPATCHING.get() {
        return;
    }
    let mut st = shared.fan.lock();
    if st.busy {
        return;
    }
    st.busy = true;
    DISPATCHING.set(true);
    loop {
        let next = st.next_seq;
        let Some(group) = st.pending.remove(&next) else {
            break;
        };
        st.next_seq = group.last + 1;
        let durable = st.live_durable.clone();
        drop(st);
        dispatch(shared, &group, &durable);
        *group.done.lock() = true;
        group.done_cv.notify_all();
        st = shared.fan.lock();
    }
    st.busy = false;
    DISPATCHING.set(false);
}

/// Runs the handlers of every live subscriber for one group.
fn dispatch(shared: &Shared, group: &Group, durable: &[Arc<DurableSub>]) {
    // One snapshot of the plain subscribers per group, not per event.
    let live = shared.live.snapshot();
    if live.is_empty() && durable.is_empty() {
        return;
    }
    let mut failures = Vec::new();
    let mut tagged = Vec::new();
    for (seq, event) in &group.events {
        dispatch_to(&live, event, &mut failures);
        for sub in durable {
            sub.deliver_live(shared, *seq, event, &mut failures);
        }
        tagged.extend(failures.drain(..).map(|f| (*seq, f)));
    }
    for sub in durable {
        sub.finish_live_group(shared, group.last);
    }
    if !tagged.is_empty() {
        group.failures.lock().extend(tagged);
    }
}

/// The newest append time in the log, or `i64::MIN` for an empty log.
pub(crate) fn last_append_ns(txn: &redb::ReadTransaction) -> Result<i64, StorageError> {
    let events = txn.open_table(EVENTS)?;
    match events.last()? {
        Some((k, v)) => {
            codec::append_ns(v.value()).map_err(|r| super::read::corrupted(k.value(), r))
        }
        None => Ok(i64::MIN),
    }
}

/// Events durable in the WAL but not yet in the redb file.
struct Unapplied {
    group: Arc<Group>,
    records: Vec<Vec<u8>>,
    append_ns: i64,
    /// When the writer acknowledged it: `apply_interval` counts from here.
    acked_at: Instant,
}

impl Unapplied {
    /// Bytes of its records (what `Shared::unapplied_bytes` counts).
    fn bytes(&self) -> u64 {
        self.records.iter().map(|r| r.len() as u64).sum()
    }
}

/// What the writer tells the applier (groups go through the shared queue,
/// which does not wake it: the applier works on its own cadence).
enum ApplyMsg {
    /// `FlushAcks`, `DeadLetter` or `Apply`: apply now, then answer.
    Now(WriteReq),
    Shutdown,
}

/// Groups handed from the writer to the applier, in `seq` order.
type ApplyQueue = Arc<Mutex<Vec<Unapplied>>>;

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
}

/// Most bytes of encoded events in one `publish_batch`, and in one group
/// commit: each is one write-ahead-log frame, whose length is a `u32`.
pub const MAX_BATCH_BYTES: usize = 256 << 20;

/// WAL bytes after which the WAL restarts (once everything is applied).
const WAL_RESTART_BYTES: u64 = 16 << 20;
/// WAL bytes after which the writer waits for the applier to restart it.
const WAL_MAX_BYTES: u64 = 64 << 20;
/// Unapplied events after which the applier applies at once.
const MAX_UNAPPLIED: usize = 20_000;
/// Bytes of unapplied records after which the writer waits for the
/// applier: what bounds the memory of acknowledged, unapplied events when
/// they are large (1 MiB payloads would otherwise pile up to
/// `WAL_MAX_BYTES` twice over: records, and events kept for fan-out).
const MAX_UNAPPLIED_BYTES: u64 = 8 << 20;

/// The largest event id in the file's id index (0 when empty).
fn max_id_in_file(shared: &Shared) -> Result<u128, StorageError> {
    let txn = redb::ReadableDatabase::begin_read(&shared.db)?;
    let table = txn.open_table(BY_ID)?;
    Ok(table.last()?.map_or(0, |(k, _)| k.value()))
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

    /// Restarts the WAL once it is big and everything in it is applied;
    /// past `WAL_MAX_BYTES`, waits for the applier first.
    fn maybe_restart_wal(&mut self) {
        let Some(wal) = &mut self.wal else { return };
        if wal.used() < WAL_RESTART_BYTES {
            return;
        }
        let shared = &self.shared;
        let last = shared.last_seq.load(Ordering::Acquire);
        if shared.applied_seq.load(Ordering::Acquire) < last && wal.used() >= WAL_MAX_BYTES {
            self.wait_for_applier();
        }
        let shared = &self.shared;
        let Some(wal) = &mut self.wal else { return };
        if shared.applied_seq.load(Ordering::Acquire) >= last {
            if let Err(e) = wal.reset() {
                tracing::error!(error = %e, "cannot restart the write-ahead log");
                shared.poisoned.store(true, Ordering::Release);
            }
            self.unapplied_ids.clear();
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
        if shared.poisoned.load(Ordering::Acquire) {
            fail_all(publishes, Vec::new(), || StorageError::Poisoned);
            return;
        }
        if shared.unapplied_bytes.load(Ordering::Acquire) >= MAX_UNAPPLIED_BYTES {
            self.wait_for_applier();
        }
        self.maybe_restart_wal();
        let start_seq = shared.last_seq.load(Ordering::Acquire) + 1;
        let append_ns = now_ns().max(self.last_append);
        // Idempotency: ids already applied (redb) or waiting (in memory).
        // The read transaction begins before the pruning below, so an id
        // pruned from memory is visible to it.
        let mut outcomes: Vec<Vec<(EventId, u64, bool)>> = Vec::with_capacity(publishes.len());
        let lookup = (|| -> Result<(), StorageError> {
            self.unapplied_ids
                .prune(shared.applied_seq.load(Ordering::Acquire));
            // Opened only for an id not above every id in the log: ids made
            // by this process's generator only grow, so fresh events skip
            // the index entirely. A table opened after the pruning above
            // sees every pruned (applied) id.
            let mut by_id: Option<redb::ReadOnlyTable<u128, u64>> = None;
            let mut next = start_seq;
            let mut fresh: HashMap<u128, u64, BuildHasherDefault<IdHasher>> = HashMap::default();
            for req in publishes.iter_mut() {
                let mut seqs = Vec::with_capacity(req.items.len());
                for item in req.items.iter_mut() {
                    let key = id_key(item.event.id.to_bytes());
                    let known = if key > self.max_id {
                        None
                    } else {
                        match self
                            .unapplied_ids
                            .get(key)
                            .or_else(|| fresh.get(&key).copied())
                        {
                            Some(s) => Some(s),
                            None => {
                                if by_id.is_none() {
                                    let txn = redb::ReadableDatabase::begin_read(&shared.db)?;
                                    by_id = Some(txn.open_table(BY_ID)?);
                                }
                                match &by_id {
                                    Some(t) => t.get(key)?.map(|g| g.value()),
                                    None => None,
                                }
                            }
                        }
                    };
                    if let Some(seq) = known {
                        seqs.push((item.event.id, seq, true));
                        continue;
                    }
                    item.record[1..9].copy_from_slice(&append_ns.to_be_bytes());
                    self.max_id = self.max_id.max(key);
                    fresh.insert(key, next);
                    seqs.push((item.event.id, next, false));
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
            for (item, (_, seq, dup)) in req.items.drain(..).zip(seqs) {
                if !dup {
                    group_events.push((*seq, item.event));
                    records.push(item.record);
                }
            }
        }
        let Some(&(last, _)) = group_events.last() else {
            // Only duplicates: nothing to write.
            reply_all(publishes, outcomes, None);
            return;
        };
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
            group: group.clone(),
            records,
            append_ns,
            acked_at: Instant::now(),
        };
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
            ApplyTarget::Thread(queue, ..) => {
                for (seq, event) in &group.events {
                    self.unapplied_ids.insert(id_key(event.id.to_bytes()), *seq);
                }
                shared
                    .unapplied_bytes
                    .fetch_add(unapplied.bytes(), Ordering::AcqRel);
                queue.lock().push(unapplied);
            }
        }
        shared.last_seq.store(last, Ordering::Release);
        shared.fan.lock().pending.insert(start_seq, group.clone());
        reply_all(publishes, outcomes, Some(group));
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
    let tick = match shared.core.lock().as_ref() {
        Some(core) => core.timeout(),
        None => return,
    };
    loop {
        let mut timeout = tick;
        let oldest = shared.queue.lock().reqs.first().map(|r| r.queued);
        if let Some(t) = oldest {
            let due = LINGER.saturating_sub(t.elapsed());
            if due.is_zero() {
                with_core(&shared, Core::commit_queued);
                continue;
            }
            timeout = timeout.min(due);
        }
        let first = match rx.recv_timeout(timeout) {
            Ok(WriteReq::Kick) => continue,
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                with_core(&shared, Core::idle);
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
        req.reply.send(Err(PublishError::Closed));
    }
}

/// Applies acknowledged groups, dead letters and subscription positions to
/// the redb file, in durable commits; runs retention.
struct Applier {
    shared: Arc<Shared>,
    /// Groups acknowledged, not yet applied; in `seq` order.
    unapplied: Vec<Unapplied>,
    unapplied_events: usize,
    oldest_unapplied: Option<Instant>,
    last_flush: Instant,
    last_retention: Instant,
    /// A WAL holds the acknowledged groups (so a failed apply loses
    /// nothing, and reopening recovers them).
    wal_backed: bool,
    /// Bytes of `unapplied` that the committer counted in
    /// `Shared::unapplied_bytes` (taken off once applied).
    counted_bytes: u64,
}

impl Applier {
    fn new(shared: Arc<Shared>, wal_backed: bool) -> Applier {
        Applier {
            shared,
            wal_backed,
            counted_bytes: 0,
            unapplied: Vec::new(),
            unapplied_events: 0,
            oldest_unapplied: None,
            last_flush: Instant::now(),
            last_retention: Instant::now(),
        }
    }

    fn push(&mut self, u: Unapplied) {
        self.unapplied_events += u.records.len();
        self.oldest_unapplied.get_or_insert(u.acked_at);
        self.unapplied.push(u);
    }

    /// How long to wait for work before the next timed apply or flush.
    fn timeout(&self) -> Duration {
        let mut t = self.shared.opts.ack_flush_interval;
        if let Some(oldest) = self.oldest_unapplied {
            t = t.min(
                self.shared
                    .opts
                    .apply_interval
                    .saturating_sub(oldest.elapsed()),
            );
        }
        t.max(Duration::from_micros(100))
    }

    /// Applies when due (or when `others` or `force` ask), then retention.
    fn tick(&mut self, others: Vec<WriteReq>, force: bool) {
        let due = self
            .oldest_unapplied
            .is_some_and(|t| t.elapsed() >= self.shared.opts.apply_interval)
            || self.unapplied_events >= MAX_UNAPPLIED;
        let acks = self.last_flush.elapsed() >= self.shared.opts.ack_flush_interval
            && acks_dirty(&self.shared);
        if force || !others.is_empty() || due || acks {
            self.apply(others);
        }
        self.maybe_retain();
    }

    /// The applier thread's loop (with a WAL): wakes every
    /// `apply_interval` (or `ack_flush_interval`, if shorter), or when asked.
    fn run(mut self, rx: Receiver<ApplyMsg>, queue: ApplyQueue) {
        let shared = self.shared.clone();
        let _dart = PoisonDart::new(&shared.poisoned, "ctrlbus-apply");
        let cadence = self
            .shared
            .opts
            .apply_interval
            .min(self.shared.opts.ack_flush_interval);
        loop {
            let mut others = Vec::new();
            let mut shutdown = false;
            let mut take = |msg: ApplyMsg| match msg {
                ApplyMsg::Now(req) => {
                    others.push(req);
                    false
                }
                ApplyMsg::Shutdown => true,
            };
            match rx.recv_timeout(cadence) {
                Ok(msg) => shutdown |= take(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => shutdown = true,
            }
            while let Ok(msg) = rx.try_recv() {
                shutdown |= take(msg);
            }
            // Groups in the queue were acknowledged before any request
            // that follows them in time: take them after the requests.
            let groups = std::mem::take(&mut *queue.lock());
            for u in groups {
                // The committer counted these in `Shared::unapplied_bytes`.
                self.counted_bytes += u.bytes();
                self.push(u);
            }
            self.tick(others, shutdown);
            if shutdown {
                break;
            }
        }
    }

    fn maybe_retain(&mut self) {
        if let Some(policy) = self.shared.opts.retention.clone()
            && self.last_retention.elapsed() >= self.shared.opts.retention_interval
        {
            self.last_retention = Instant::now();
            self.apply(Vec::new());
            if let Err(e) = upkeep::retain(&self.shared, &policy) {
                tracing::warn!(error = %e, "retention failed");
            }
        }
    }

    /// Applies every unapplied group to redb, with the hooks, the dead letters
    /// in `others` and the subscriptions' positions, in one durable commit.
    /// True on success. A failure poisons the bus when a WAL holds the
    /// events (reopening recovers them from it).
    fn apply(&mut self, others: Vec<WriteReq>) -> bool {
        let shared = self.shared.clone();
        if shared.poisoned.load(Ordering::Acquire) {
            fail_all(Vec::new(), others, || StorageError::Poisoned);
            return false;
        }
        let subs: Vec<Arc<DurableSub>> = shared.durable.lock().values().cloned().collect();
        let mut cursor_writes: Vec<(Arc<DurableSub>, u64)> = Vec::new();
        let result = (|| -> Result<(), StorageError> {
            // Not `txn::write`: the poison check was made above, and a
            // failed apply must still answer `others`.
            let txn = super::txn::begin(&shared)?;
            {
                let mut events = txn.open_table(EVENTS)?;
                let mut by_id = txn.open_table(BY_ID)?;
                for u in &self.unapplied {
                    for ((seq, event), record) in u.group.events.iter().zip(&u.records) {
                        events.insert(*seq, record.as_slice())?;
                        by_id.insert(id_key(event.id.to_bytes()), *seq)?;
                    }
                }
            }
            for u in &self.unapplied {
                let appended: Vec<(u64, &Event)> =
                    u.group.events.iter().map(|(s, e)| (*s, e)).collect();
                for hook in shared.hooks.read().iter() {
                    hook.on_append(&txn, &appended, u.append_ns)?;
                }
            }
            {
                let mut dead = txn.open_table(DEAD_LETTERS)?;
                for req in &others {
                    if let WriteReq::DeadLetter {
                        name, seq, record, ..
                    } = req
                    {
                        dead.insert((name.as_str(), *seq), record.as_slice())?;
                    }
                }
                let mut cursors = txn.open_table(CURSORS)?;
                let now = now_ns();
                for sub in &subs {
                    if let Some((record, delivered)) = sub.record_to_store(now) {
                        cursors.insert(sub.name.as_str(), to_bytes(&record).as_slice())?;
                        cursor_writes.push((sub.clone(), delivered));
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })();
        self.last_flush = Instant::now();
        match result {
            Err(e) => {
                tracing::error!(error = %e, "commit failed");
                if self.wal_backed || matches!(&e, StorageError::Redb(redb::Error::PreviousIo)) {
                    shared.poisoned.store(true, Ordering::Release);
                }
                if !self.wal_backed {
                    // Without a WAL the group was not durable; forget it (its
                    // publishers are told by the caller).
                    self.unapplied.clear();
                    self.unapplied_events = 0;
                    self.oldest_unapplied = None;
                }
                let reason = e.to_string();
                fail_all(Vec::new(), others, || StorageError::CommitFailed {
                    reason: reason.clone(),
                });
                false
            }
            Ok(()) => {
                for (sub, delivered) in cursor_writes {
                    sub.mark_stored(delivered);
                }
                for sub in &subs {
                    sub.mark_durable();
                }
                let applied_any = !self.unapplied.is_empty();
                if let Some(u) = self.unapplied.last() {
                    shared.applied_seq.store(u.group.last, Ordering::Release);
                }
                shared
                    .unapplied_bytes
                    .fetch_sub(std::mem::take(&mut self.counted_bytes), Ordering::AcqRel);
                self.unapplied.clear();
                self.unapplied_events = 0;
                self.oldest_unapplied = None;
                if applied_any {
                    for hook in shared.hooks.read().iter() {
                        hook.after_commit();
                    }
                }
                for req in others {
                    match req {
                        WriteReq::FlushAcks(Some(r))
                        | WriteReq::DeadLetter { reply: r, .. }
                        | WriteReq::Apply(r) => {
                            let _ = r.send(Ok(()));
                        }
                        _ => {}
                    }
                }
                true
            }
        }
    }
}

/// Answers every publish of a group. Waking a parked publisher is a system
/// call, so the committer wakes one publisher, which wakes the others: the
/// first whose publisher is already waiting for it. A publish submitted and
/// not yet waited for is passed over, so the others never wait for its
/// publisher to call `wait`. If nobody waits yet, each is simply answered.
fn reply_all(
    publishes: Vec<PublishReq>,
    outcomes: Vec<Vec<(EventId, u64, bool)>>,
    group: Option<Arc<Group>>,
) {
    let outcome = |seqs: Vec<(EventId, u64, bool)>, wake| {
        let has_new = seqs.iter().any(|s| !s.2);
        Ok(Outcome {
            seqs,
            group: if has_new { group.clone() } else { None },
            wake,
        })
    };
    let mut replies: Vec<_> = publishes.into_iter().zip(outcomes).collect();
    let Some(delegate) = replies.iter().position(|(r, _)| r.reply.is_awaited()) else {
        for (req, seqs) in replies {
            req.reply.send(outcome(seqs, Vec::new()));
        }
        return;
    };
    let (req, seqs) = replies.remove(delegate);
    let wakers = replies
        .into_iter()
        .map(|(r, seqs)| r.reply.fill(outcome(seqs, Vec::new())))
        .collect();
    req.reply.send(outcome(seqs, wakers));
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

fn acks_dirty(shared: &Shared) -> bool {
    shared.durable.lock().values().any(|s| s.ack_dirty())
}

fn fail_all(publishes: Vec<PublishReq>, others: Vec<WriteReq>, err: impl Fn() -> StorageError) {
    for req in publishes {
        req.reply.send(Err(PublishError::Storage(err())));
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

/// Replays the WAL frames that the redb file does not hold yet (after a
/// crash), through the same hooks as a live commit, in one durable commit;
/// then restarts the WAL.
pub(crate) fn recover(
    shared: &Shared,
    wal: &mut Wal,
    frames: Vec<super::wal::Frame>,
) -> Result<u64, StorageError> {
    let mut next = shared.last_seq.load(Ordering::Acquire) + 1;
    let mut replayed = 0u64;
    let txn = super::txn::begin(shared)?;
    {
        let mut events = txn.open_table(EVENTS)?;
        let mut by_id = txn.open_table(BY_ID)?;
        let mut appended: Vec<(u64, Event, i64)> = Vec::new();
        'frames: for frame in frames {
            for (i, record) in frame.records.iter().enumerate() {
                let seq = frame.first_seq + i as u64;
                if seq < next {
                    continue; // already in the redb file
                }
                if seq > next {
                    // A gap between the file and the WAL: damage. What
                    // follows can't be placed in `seq` order (G3).
                    tracing::warn!(
                        expected = next,
                        found = seq,
                        "a write-ahead-log frame is out of sequence; the log ends before it"
                    );
                    break 'frames;
                }
                let (append, rec) =
                    codec::decode_ref(record).map_err(|r| super::read::corrupted(seq, r))?;
                let event = rec.to_event().map_err(|r| super::read::corrupted(seq, r))?;
                events.insert(seq, record.as_slice())?;
                by_id.insert(id_key(rec.id), seq)?;
                appended.push((seq, event, append));
                next += 1;
                replayed += 1;
            }
        }
        for hook in shared.hooks.read().iter() {
            // Hooks see each replayed group with its own append time.
            let mut i = 0;
            while i < appended.len() {
                let t = appended[i].2;
                let j = appended[i..]
                    .iter()
                    .position(|a| a.2 != t)
                    .map_or(appended.len(), |k| i + k);
                let part: Vec<(u64, &Event)> =
                    appended[i..j].iter().map(|(s, e, _)| (*s, e)).collect();
                hook.on_append(&txn, &part, t)?;
                i = j;
            }
        }
    }
    txn.commit()?;
    shared.last_seq.store(next - 1, Ordering::Release);
    shared.applied_seq.store(next - 1, Ordering::Release);
    shared.fan.lock().next_seq = next;
    wal.reset()
        .map_err(|e| StorageError::Redb(redb::Error::Io(e)))?;
    Ok(replayed)
}

/// Waits until every event up to `seq` is in the redb file (so that a read
/// transaction sees it): read-your-writes for `read`, `recent_events` and
/// catch-up.
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
                reply,
                queued: Instant::now(),
            });
            rxs.push(rx);
        }
        let outcomes = (1..=3)
            .map(|seq| vec![(EventId::new(), seq, false)])
            .collect();
        reply_all(reqs, outcomes, None);
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
