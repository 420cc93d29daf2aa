//! Group commit and ordered fan-out.
//!
//! One writer thread owns every write transaction that appends events.
//! Publishers send it prepared records; it takes all requests waiting (up to
//! `max_group_events`), appends them in one transaction with consecutive
//! `seq`s and commits with one fsync. The group commit technique is the one
//! of database WALs (e.g. PostgreSQL's `commit_delay`-less group commit):
//! requests that arrive while a commit is running form the next group.
//!
//! Fan-out invariants (`FanState`):
//! - A group enters `pending` only after its commit returned (G1).
//! - Groups are dispatched in `seq` order: the group dispatched next is the
//!   one whose first `seq` equals `next_seq`.
//! - At most one thread dispatches at a time (`busy`, the baton), so each
//!   subscriber sees events in `seq` order. Dispatch runs with no lock held.
//! - `live_durable` changes only under the `fan` lock, and the dispatcher
//!   snapshots it under the same lock when it takes a group; a durable
//!   subscription switches to live only when it has handled everything
//!   before `next_seq`, so the switch has no gap and no duplicate.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use redb::{Durability, ReadableTable};

use super::codec;
use super::subscription::DurableSub;
use super::tables::{BY_ID, CURSORS, DEAD_LETTERS, EVENTS, to_bytes};
use super::{Shared, upkeep};
use crate::bus::{HandlerFailure, Receipt};
use crate::error::{PublishError, StorageError};
use crate::event::Event;
use crate::id::EventId;
use crate::sync::{Condvar, Mutex};

/// Something that writes beside the events in their own transaction (the
/// webhook dispatcher creates delivery records this way, so that no crash
/// can separate an event from its deliveries).
pub(crate) trait AppendHook: Send + Sync {
    /// Called inside the write transaction, after the events are inserted.
    fn on_append(
        &self,
        txn: &redb::WriteTransaction,
        appended: &[(u64, &Event)],
        append_ns: i64,
    ) -> Result<(), StorageError>;
    /// Called after the transaction committed.
    fn after_commit(&self) {}
}

/// A request to the writer thread.
pub(crate) enum WriteReq {
    Publish(PublishReq),
    /// Store acknowledged positions now; reply when durable.
    FlushAcks(Option<Sender<Result<(), String>>>),
    /// Store a dead letter and move the cursor past it; reply when durable.
    DeadLetter {
        name: String,
        seq: u64,
        record: Vec<u8>,
        reply: Sender<Result<(), String>>,
    },
    Shutdown,
}

pub(crate) struct PublishReq {
    items: Vec<Prepared>,
    reply: Sender<Result<Outcome, PublishError>>,
}

struct Prepared {
    event: Event,
    record: Vec<u8>,
}

/// What the writer tells one publisher.
struct Outcome {
    /// Per event of the request: its `seq` and whether it was a duplicate.
    seqs: Vec<(EventId, u64, bool)>,
    group: Option<Arc<Group>>,
}

/// Events committed together, waiting for or undergoing fan-out.
pub(crate) struct Group {
    first: u64,
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

/// Publishes events: validate and encode here, commit on the writer thread,
/// fan out in order, return receipts.
pub(crate) fn publish(
    shared: &Arc<Shared>,
    events: Vec<Event>,
) -> Result<Vec<Receipt>, PublishError> {
    if shared.closed.load(Ordering::Acquire) {
        return Err(PublishError::Closed);
    }
    if events.is_empty() {
        return Ok(Vec::new());
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
    for event in events {
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
        items.push(Prepared { event, record });
    }
    let (reply, rx) = crossbeam_channel::bounded(1);
    shared
        .tx
        .send(WriteReq::Publish(PublishReq { items, reply }))
        .map_err(|_| PublishError::Closed)?;
    let outcome = rx.recv().map_err(|_| PublishError::Closed)??;
    let mut failures: Vec<(u64, HandlerFailure)> = Vec::new();
    if let Some(group) = &outcome.group {
        fan_out(shared, group);
        if !DISPATCHING.get() {
            group.wait();
            let mine: HashSet<u64> = outcome.seqs.iter().filter(|s| !s.2).map(|s| s.1).collect();
            failures = group
                .failures
                .lock()
                .iter()
                .filter(|(s, _)| mine.contains(s))
                .cloned()
                .collect();
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

/// Takes the baton if nobody holds it and dispatches every ready group in
/// order. A re-entrant publish (from inside a handler) returns at once: its
/// group is dispatched by the loop that is already running.
fn fan_out(shared: &Shared, _group: &Arc<Group>) {
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
    let mut failures = Vec::new();
    let mut tagged = Vec::new();
    for (seq, event) in &group.events {
        shared.live.dispatch(event, &mut failures);
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

fn now_ns() -> i64 {
    jiff::Timestamp::now()
        .as_nanosecond()
        .clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// The writer thread.
pub(crate) fn writer_loop(shared: Arc<Shared>, rx: Receiver<WriteReq>, mut last_append: i64) {
    let mut last_flush = Instant::now();
    let mut last_retention = Instant::now();
    let max = shared.opts.max_group_events;
    loop {
        let first = match rx.recv_timeout(shared.opts.ack_flush_interval) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                if acks_dirty(&shared) {
                    let _ = commit_group(&shared, Vec::new(), Vec::new(), &mut last_append);
                    last_flush = Instant::now();
                }
                maybe_retain(&shared, &mut last_retention);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut publishes = Vec::new();
        let mut others = Vec::new();
        let mut count = 0;
        let mut shutdown = false;
        let mut take = |req: WriteReq, count: &mut usize| match req {
            WriteReq::Publish(p) => {
                *count += p.items.len();
                publishes.push(p);
                false
            }
            WriteReq::Shutdown => true,
            other => {
                others.push(other);
                false
            }
        };
        shutdown |= take(first, &mut count);
        while count < max && !shutdown {
            match rx.try_recv() {
                Ok(req) => shutdown |= take(req, &mut count),
                Err(_) => break,
            }
        }
        if !publishes.is_empty()
            || !others.is_empty()
            || shutdown
            || last_flush.elapsed() >= shared.opts.ack_flush_interval
        {
            let _ = commit_group(&shared, publishes, others, &mut last_append);
            last_flush = Instant::now();
        }
        if shutdown {
            // Refuse whatever is still queued.
            while let Ok(req) = rx.try_recv() {
                refuse(req);
            }
            break;
        }
        maybe_retain(&shared, &mut last_retention);
    }
}

fn refuse(req: WriteReq) {
    match req {
        WriteReq::Publish(p) => {
            let _ = p.reply.send(Err(PublishError::Closed));
        }
        WriteReq::FlushAcks(Some(r)) | WriteReq::DeadLetter { reply: r, .. } => {
            let _ = r.send(Err("the bus is closed".into()));
        }
        _ => {}
    }
}

fn maybe_retain(shared: &Shared, last: &mut Instant) {
    if let Some(policy) = &shared.opts.retention {
        if last.elapsed() >= shared.opts.retention_interval {
            *last = Instant::now();
            if let Err(e) = upkeep::retain(shared, policy) {
                tracing::warn!(error = %e, "retention failed");
            }
        }
    }
}

fn acks_dirty(shared: &Shared) -> bool {
    shared.durable.lock().values().any(|s| s.ack_dirty())
}

/// One write transaction: append the publishes, run the hooks, store dead
/// letters and cursor positions, commit, then queue the group for fan-out
/// and answer every request.
fn commit_group(
    shared: &Shared,
    mut publishes: Vec<PublishReq>,
    others: Vec<WriteReq>,
    last_append: &mut i64,
) -> Result<(), ()> {
    if shared.poisoned.load(Ordering::Acquire) {
        fail_all(publishes, others, || StorageError::Poisoned);
        return Err(());
    }
    let start_seq = shared.last_seq.load(Ordering::Acquire) + 1;
    let append_ns = now_ns().max(*last_append);
    let subs: Vec<Arc<DurableSub>> = shared.durable.lock().values().cloned().collect();
    let mut outcomes: Vec<Vec<(EventId, u64, bool)>> = Vec::with_capacity(publishes.len());
    let mut group_events: Vec<(u64, Event)> = Vec::new();
    let mut cursor_writes: Vec<(Arc<DurableSub>, u64)> = Vec::new();
    let result = (|| -> Result<redb::WriteTransaction, StorageError> {
        let mut txn = shared.db.begin_write()?;
        txn.set_durability(if shared.opts.sync {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        txn.set_quick_repair(shared.opts.quick_repair);
        let mut next = start_seq;
        {
            let mut events = txn.open_table(EVENTS)?;
            let mut by_id = txn.open_table(BY_ID)?;
            for req in publishes.iter_mut() {
                let mut seqs = Vec::with_capacity(req.items.len());
                for item in req.items.iter_mut() {
                    let key = item.event.id.to_bytes();
                    if let Some(seq) = by_id.get(key)? {
                        seqs.push((item.event.id, seq.value(), true));
                        continue;
                    }
                    item.record[1..9].copy_from_slice(&append_ns.to_be_bytes());
                    events.insert(next, item.record.as_slice())?;
                    by_id.insert(key, next)?;
                    seqs.push((item.event.id, next, false));
                    next += 1;
                }
                outcomes.push(seqs);
            }
        }
        // Move the new events into the group (in seq order).
        for (req, seqs) in publishes.iter_mut().zip(&outcomes) {
            for (item, (_, seq, dup)) in req.items.drain(..).zip(seqs) {
                if !dup {
                    group_events.push((*seq, item.event));
                }
            }
        }
        if !group_events.is_empty() {
            let appended: Vec<(u64, &Event)> = group_events.iter().map(|(s, e)| (*s, e)).collect();
            for hook in shared.hooks.read().iter() {
                hook.on_append(&txn, &appended, append_ns)?;
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
            for sub in &subs {
                if let Some((record, delivered)) = sub.record_to_store(now_ns()) {
                    cursors.insert(sub.name.as_str(), to_bytes(&record).as_slice())?;
                    cursor_writes.push((sub.clone(), delivered));
                }
            }
        }
        Ok(txn)
    })();
    let committed = result.and_then(|txn| txn.commit().map_err(StorageError::from));
    match committed {
        Err(e) => {
            tracing::error!(error = %e, "commit failed; nothing from this group was stored");
            if matches!(&e, StorageError::Redb(redb::Error::PreviousIo)) {
                shared.poisoned.store(true, Ordering::Release);
            }
            let msg = e.to_string();
            let mut first = Some(e);
            for req in publishes {
                let err = first.take().unwrap_or_else(|| {
                    StorageError::Redb(redb::Error::Io(std::io::Error::other(msg.clone())))
                });
                let _ = req.reply.send(Err(PublishError::Storage(err)));
            }
            for req in others {
                match req {
                    WriteReq::FlushAcks(Some(r)) | WriteReq::DeadLetter { reply: r, .. } => {
                        let _ = r.send(Err(msg.clone()));
                    }
                    _ => {}
                }
            }
            Err(())
        }
        Ok(()) => {
            for (sub, delivered) in cursor_writes {
                sub.mark_stored(delivered);
            }
            let last = group_events.last().map(|(s, _)| *s);
            if !group_events.is_empty() {
                *last_append = append_ns;
            }
            let group = last.map(|last| {
                Arc::new(Group {
                    first: start_seq,
                    last,
                    events: group_events,
                    failures: Mutex::new(Vec::new()),
                    done: Mutex::new(false),
                    done_cv: Condvar::new(),
                })
            });
            if let Some(g) = &group {
                shared.last_seq.store(g.last, Ordering::Release);
                shared.fan.lock().pending.insert(g.first, g.clone());
                for hook in shared.hooks.read().iter() {
                    hook.after_commit();
                }
            }
            for (req, seqs) in publishes.into_iter().zip(outcomes) {
                let has_new = seqs.iter().any(|s| !s.2);
                let _ = req.reply.send(Ok(Outcome {
                    seqs,
                    group: if has_new { group.clone() } else { None },
                }));
            }
            for req in others {
                match req {
                    WriteReq::FlushAcks(Some(r)) | WriteReq::DeadLetter { reply: r, .. } => {
                        let _ = r.send(Ok(()));
                    }
                    _ => {}
                }
            }
            Ok(())
        }
    }
}

fn fail_all(publishes: Vec<PublishReq>, others: Vec<WriteReq>, err: impl Fn() -> StorageError) {
    for req in publishes {
        let _ = req.reply.send(Err(PublishError::Storage(err())));
    }
    for req in others {
        match req {
            WriteReq::FlushAcks(Some(r)) | WriteReq::DeadLetter { reply: r, .. } => {
                let _ = r.send(Err(err().to_string()));
            }
            _ => {}
        }
    }
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
