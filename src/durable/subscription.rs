//! Named durable subscriptions: cursors that survive restarts.
//!
//! A subscription is in one of two modes:
//! - **live**: it is in `FanState::live_durable` and its handler runs inside
//!   `publish`, on the dispatching thread, in `seq` order;
//! - **catch-up**: its own worker thread reads the log from `delivered + 1`,
//!   retrying failed events with backoff and moving them to the dead letters
//!   after `max_deliveries`; when it has handled everything before the fan-out
//!   position it switches to live under the fan-out lock (see `commit`).
//!
//! A handler error or a handler slower than `slow_handler` on a live event
//! detaches the subscription into catch-up, so publishers stop waiting on it.
//!
//! Invariant: `delivered` only grows while the subscription is active, and
//! every event with `seq <= delivered` has been handled (acknowledged or
//! dead-lettered). `durable_at <= stored <= delivered`: `stored` is the
//! position last written to the `cursors` table, `durable_at` the one last
//! made durable. Positions are written whenever the writer applies to the
//! redb file (every `apply_interval` while events arrive), every
//! `ack_flush_interval` when idle, and as soon as a subscription's position
//! is `ack_flush_events` past `durable_at`, in which case the delivering
//! thread (the catch-up worker, or the fan-out dispatcher after a live
//! group) waits until it is durable. So after a crash a subscription sees
//! again at most the events it handled after its last durable position:
//! fewer than `ack_flush_events` plus one commit group.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use jiff::Timestamp;
use redb::{ReadableDatabase, ReadableTable};
use serde::Serialize;

use super::Shared;
use super::codec;
use super::commit::{self, WriteReq};
use super::read::{self, Position, resolve};
use super::tables::{
    CURSORS, CursorRecord, DEAD_LETTERS, DeadLetterRecord, EVENTS, from_bytes, to_bytes,
};
use crate::bus::{Handler, HandlerFailure, SubscriptionId};
use crate::error::{CursorError, ReadError, StorageError, SubscribeError};
use crate::event::Event;
use crate::fanout;
use crate::filter::Filter;
use crate::sync::Mutex;
use crate::time::{now_ns, ts};

/// Longest subscription name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// One active durable subscription.
pub(crate) struct DurableSub {
    pub(crate) name: String,
    id: SubscriptionId,
    filter: Filter,
    handler: Box<dyn Handler>,
    delivered: AtomicU64,
    /// The position last written to the `cursors` table (maybe not yet
    /// durable, when a WAL is in use).
    stored: AtomicU64,
    /// The position last made durable.
    durable_at: AtomicU64,
    /// The stored record, but for `delivered` (taken from the atomic).
    record: Mutex<CursorRecord>,
    live: AtomicBool,
    /// The first `seq` of the current live period (set under the fan-out
    /// lock when switching to live). A group the dispatcher took before the
    /// switch may still list this subscription; its events below this
    /// `seq` were delivered by catch-up and must not be delivered again.
    live_from: AtomicU64,
    stop: AtomicBool,
    /// Deliveries already made of event `delivered + 1` (a failed live one).
    pending_attempts: AtomicU32,
    last_error: Mutex<Option<String>>,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl DurableSub {
    /// Delivers one live event (called by the fan-out dispatcher).
    pub(crate) fn deliver_live(
        &self,
        shared: &Shared,
        seq: u64,
        event: &Event,
        failures: &mut Vec<HandlerFailure>,
    ) {
        if !self.live.load(Ordering::Acquire)
            || seq < self.live_from.load(Ordering::Acquire)
            || !self.filter.matches(event)
        {
            return;
        }
        let started = Instant::now();
        match fanout::call(self.id, self.handler.as_ref(), event) {
            Ok(()) => {
                self.delivered.store(seq, Ordering::Release);
                if started.elapsed() > shared.opts.slow_handler {
                    tracing::warn!(subscription = %self.name, seq, "slow handler: detached into catch-up");
                    self.detach(shared);
                }
            }
            Err(f) => {
                tracing::warn!(subscription = %self.name, seq, error = %f.error, "handler failed: detached into catch-up");
                self.delivered.store(seq - 1, Ordering::Release);
                self.pending_attempts.store(1, Ordering::Release);
                *self.last_error.lock() = Some(f.error.clone());
                failures.push(f);
                self.detach(shared);
            }
        }
    }

    /// After a group: a live subscription has handled (or skipped) every
    /// event of it.
    pub(crate) fn finish_live_group(&self, shared: &Shared, last: u64) {
        if self.live.load(Ordering::Acquire) && last >= self.live_from.load(Ordering::Acquire) {
            self.delivered.store(last, Ordering::Release);
            // Wait until the position is durable, as catch-up does. Only
            // asking for a flush let the dispatcher run further groups
            // before the writer stored the position, so a crash could
            // redeliver more than the documented window.
            if last.saturating_sub(self.durable_at.load(Ordering::Acquire))
                >= shared.opts.ack_flush_events
            {
                let _ = commit::flush_acks(shared, Duration::from_secs(30));
            }
        }
    }

    fn detach(&self, shared: &Shared) {
        self.live.store(false, Ordering::Release);
        shared.fan.lock().live_durable.retain(|s| s.id != self.id);
        let _ = self.wake_tx.try_send(());
    }

    pub(crate) fn ack_dirty(&self) -> bool {
        self.delivered.load(Ordering::Acquire) != self.stored.load(Ordering::Acquire)
    }

    /// The record to store if the position moved since the last store.
    pub(crate) fn record_to_store(&self, now: i64) -> Option<(CursorRecord, u64)> {
        let d = self.delivered.load(Ordering::Acquire);
        if d == self.stored.load(Ordering::Acquire) {
            return None;
        }
        let mut rec = self.record.lock().clone();
        rec.delivered = d;
        rec.updated_ns = now;
        Some((rec, d))
    }

    /// The writer wrote `delivered` to the cursors table.
    pub(crate) fn mark_stored(&self, delivered: u64) {
        self.stored.fetch_max(delivered, Ordering::AcqRel);
    }

    /// A durable commit happened: what was written is now durable.
    pub(crate) fn mark_durable(&self) {
        self.durable_at
            .fetch_max(self.stored.load(Ordering::Acquire), Ordering::AcqRel);
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.live.store(false, Ordering::Release);
        let _ = self.wake_tx.try_send(());
    }

    pub(crate) fn join(&self) {
        let worker = self.worker.lock().take();
        if let Some(w) = worker
            && w.thread().id() != std::thread::current().id()
        {
            let _ = w.join();
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Sleeps up to `d`, waking early when stopped.
    fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        while !self.stopped() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = self.wake_rx.recv_timeout(left);
        }
    }

    /// The worker thread: catch up, switch to live, wait; until stopped.
    fn run(self: Arc<Self>, shared: Arc<Shared>) {
        while !self.stopped() {
            if self.live.load(Ordering::Acquire) {
                let _ = self.wake_rx.recv_timeout(Duration::from_millis(500));
                continue;
            }
            match self.catch_up(&shared) {
                Ok(true) => {}
                Ok(false) => {
                    // Caught up: switch to live at exactly next_seq.
                    let mut fan = shared.fan.lock();
                    if self.delivered.load(Ordering::Acquire) + 1 == fan.next_seq && !self.stopped()
                    {
                        self.live_from.store(fan.next_seq, Ordering::Release);
                        self.live.store(true, Ordering::Release);
                        fan.live_durable.push(self.clone());
                    }
                }
                Err(e) => {
                    tracing::error!(subscription = %self.name, error = %e, "catch-up read failed; retrying");
                    *self.last_error.lock() = Some(e.to_string());
                    self.sleep(shared.opts.max_retry_backoff);
                }
            }
        }
        // Store the final position, durably.
        if self.delivered.load(Ordering::Acquire) != self.durable_at.load(Ordering::Acquire) {
            let _ = commit::flush_acks(&shared, Duration::from_secs(10));
        }
    }

    /// Delivers a chunk from the log; `Ok(true)` if it made progress and more
    /// may follow, `Ok(false)` if caught up with the fan-out position.
    fn catch_up(&self, shared: &Shared) -> Result<bool, ReadError> {
        const CHUNK: usize = 512;
        let target = shared.fan.lock().next_seq - 1;
        let from = self.delivered.load(Ordering::Acquire) + 1;
        if from > target {
            return Ok(false);
        }
        // Events acknowledged through the WAL may not be in the file yet.
        commit::ensure_applied(shared, target).map_err(|_| ReadError::Closed)?;
        // Read a chunk into memory, so no read transaction is held while
        // handlers run (a long-held one would pin old pages of the file).
        let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(CHUNK);
        {
            let txn = shared.db.begin_read().map_err(StorageError::from)?;
            let events = txn.open_table(EVENTS).map_err(StorageError::from)?;
            for kv in events
                .range(from..=target)
                .map_err(StorageError::from)?
                .take(CHUNK)
            {
                let (k, v) = kv.map_err(StorageError::from)?;
                batch.push((k.value(), v.value().to_vec()));
            }
        }
        let mut expected = from;
        for (seq, bytes) in batch {
            if self.stopped() {
                return Ok(true);
            }
            if seq > expected {
                // Removed by retention before we got there.
                self.record.lock().missed += seq - expected;
                tracing::warn!(subscription = %self.name, missed = seq - expected, "events removed by retention were skipped");
            }
            expected = seq + 1;
            // A record that can't be decoded (disk corruption) is
            // dead-lettered with its reason, never retried forever (G11);
            // one whose filter fields decode is judged by them first.
            let decoded = codec::decode_ref(&bytes).and_then(|(_, rec)| {
                if self
                    .filter
                    .matches_parts(rec.event_type, rec.tenant_id, rec.instance())
                {
                    rec.to_event().map(Some)
                } else {
                    Ok(None)
                }
            });
            let delivered = match decoded {
                Ok(None) => true,
                Ok(Some(event)) => self.deliver_with_retry(shared, seq, &event),
                Err(reason) => {
                    let error = format!("the record at seq {seq} can't be decoded: {reason}");
                    tracing::error!(subscription = %self.name, seq, %error, "dead-lettering an undecodable record");
                    *self.last_error.lock() = Some(error.clone());
                    self.dead_letter(shared, seq, error, 0)
                }
            };
            if !delivered {
                return Ok(true); // stopped
            }
            self.delivered.store(seq, Ordering::Release);
            if seq.saturating_sub(self.durable_at.load(Ordering::Acquire))
                >= shared.opts.ack_flush_events
            {
                let _ = commit::flush_acks(shared, Duration::from_secs(30));
            }
        }
        if expected <= target && expected == from {
            // Nothing in range: everything up to target was removed.
            self.record.lock().missed += target + 1 - from;
            self.delivered.store(target, Ordering::Release);
        }
        Ok(true)
    }

    /// Delivers one event until it succeeds or is dead-lettered. False if
    /// the subscription was stopped first.
    fn deliver_with_retry(&self, shared: &Shared, seq: u64, event: &Event) -> bool {
        let mut attempt = self.pending_attempts.swap(0, Ordering::AcqRel);
        let mut backoff = shared.opts.retry_backoff;
        loop {
            // A failed live delivery counts as an attempt: once
            // `max_deliveries` are used up, dead-letter without delivering
            // again.
            let exhausted = attempt >= shared.opts.max_deliveries;
            if attempt > 0 && !exhausted {
                self.sleep(backoff);
                backoff = (backoff * 2).min(shared.opts.max_retry_backoff);
            }
            if self.stopped() {
                self.pending_attempts.store(attempt, Ordering::Release);
                return false;
            }
            let error = if exhausted {
                self.last_error.lock().clone().unwrap_or_default()
            } else {
                attempt += 1;
                match fanout::call(self.id, self.handler.as_ref(), event) {
                    Ok(()) => return true,
                    Err(f) => f.error,
                }
            };
            *self.last_error.lock() = Some(error.clone());
            if attempt >= shared.opts.max_deliveries {
                return self.dead_letter(shared, seq, error, attempt);
            }
        }
    }

    /// Moves the event at `seq` to the dead letters, with the cursor past
    /// it in the same commit; retries the commit until it holds. False if
    /// the subscription was stopped first.
    fn dead_letter(&self, shared: &Shared, seq: u64, error: String, attempts: u32) -> bool {
        let record = to_bytes(&DeadLetterRecord {
            error: error.clone(),
            attempts,
            at_ns: now_ns(),
        });
        loop {
            self.delivered.store(seq, Ordering::Release);
            let (reply, rx) = crossbeam_channel::bounded(1);
            let sent = shared.tx.send(WriteReq::DeadLetter {
                name: self.name.clone(),
                seq,
                record: record.clone(),
                reply,
            });
            match sent.ok().and_then(|_| rx.recv().ok()) {
                Some(Ok(())) => {
                    tracing::warn!(subscription = %self.name, seq, attempts, %error, "event moved to dead letters");
                    return true;
                }
                _ => {
                    self.delivered.store(seq - 1, Ordering::Release);
                    if self.stopped() || shared.closed.load(Ordering::Acquire) {
                        return false;
                    }
                    self.sleep(shared.opts.max_retry_backoff);
                }
            }
        }
    }
}

/// A running durable subscription. Dropping it (or calling
/// [`DurableSubscription::unsubscribe`]) stops delivery and stores the
/// final position; the cursor stays, and a later `subscribe_durable` with
/// the same name resumes from it.
pub struct DurableSubscription {
    sub: Arc<DurableSub>,
    shared: Weak<Shared>,
}

impl std::fmt::Debug for DurableSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableSubscription")
            .field("name", &self.sub.name)
            .field("delivered", &self.position())
            .field("live", &self.is_live())
            .finish()
    }
}

impl DurableSubscription {
    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.sub.name
    }

    /// True while caught up and receiving events inside `publish`.
    pub fn is_live(&self) -> bool {
        self.sub.live.load(Ordering::Acquire)
    }

    /// Waits until the subscription is live, up to `timeout`; true if it is.
    pub fn wait_live(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.is_live() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Every event with `seq` up to this one has been handled.
    pub fn position(&self) -> u64 {
        self.sub.delivered.load(Ordering::Acquire)
    }

    /// The last handler error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.sub.last_error.lock().clone()
    }

    /// Delivers every dead-lettered event of this subscription to its
    /// handler again, on this thread, oldest first; those that succeed leave
    /// the dead letters. Out of `seq` order by nature.
    ///
    /// # Errors
    /// [`CursorError::Storage`] when storage fails; [`CursorError::Closed`]
    /// when the bus is gone.
    pub fn redrive_dead_letters(&self) -> Result<RedriveReport, CursorError> {
        let shared = self.shared.upgrade().ok_or(CursorError::Closed)?;
        let letters = dead_letters(&shared.db, &self.sub.name)?;
        let mut report = RedriveReport::default();
        for letter in letters {
            let event = {
                let txn = shared.db.begin_read().map_err(StorageError::from)?;
                let events = txn.open_table(EVENTS).map_err(StorageError::from)?;
                let bytes = events.get(letter.seq).map_err(StorageError::from)?;
                match bytes {
                    None => None,
                    Some(b) => {
                        let (_, rec) = codec::decode_ref(b.value())
                            .map_err(|r| read::corrupted(letter.seq, r))?;
                        Some(rec.to_event().map_err(|r| read::corrupted(letter.seq, r))?)
                    }
                }
            };
            // The handler runs before the write transaction opens: user
            // code never holds the write lock (every publish waits on it).
            let outcome = event.map(|e| fanout::call(self.sub.id, self.sub.handler.as_ref(), &e));
            let txn = super::txn::write(&shared)?;
            {
                let mut dead = txn.open_table(DEAD_LETTERS).map_err(StorageError::from)?;
                let key = (self.sub.name.as_str(), letter.seq);
                match outcome {
                    None => {
                        dead.remove(key).map_err(StorageError::from)?;
                        report.gone += 1;
                    }
                    Some(Ok(())) => {
                        dead.remove(key).map_err(StorageError::from)?;
                        report.succeeded += 1;
                    }
                    Some(Err(f)) => {
                        let rec = DeadLetterRecord {
                            error: f.error,
                            attempts: letter.attempts + 1,
                            at_ns: now_ns(),
                        };
                        dead.insert(key, to_bytes(&rec).as_slice())
                            .map_err(StorageError::from)?;
                        report.failed += 1;
                    }
                }
            }
            txn.commit().map_err(StorageError::from)?;
        }
        Ok(report)
    }

    /// Stops the subscription and stores its final position.
    pub fn unsubscribe(self) {}
}

impl Drop for DurableSubscription {
    fn drop(&mut self) {
        self.sub.stop();
        if let Some(shared) = self.shared.upgrade() {
            shared
                .fan
                .lock()
                .live_durable
                .retain(|s| s.id != self.sub.id);
            self.sub.join();
            let mut map = shared.durable.lock();
            if map
                .get(&self.sub.name)
                .is_some_and(|s| Arc::ptr_eq(s, &self.sub))
            {
                map.remove(&self.sub.name);
            }
        } else {
            self.sub.join();
        }
    }
}

/// What re-driving dead letters did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RedriveReport {
    /// Handled this time; removed from the dead letters.
    pub succeeded: u64,
    /// Failed again; kept, with the attempt count raised.
    pub failed: u64,
    /// Their event was removed by retention; removed from the dead letters.
    pub gone: u64,
}

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

fn info(
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
        missed: active.map(|s| s.record.lock().missed).unwrap_or(rec.missed),
        created_at: ts(rec.created_ns),
        updated_at: ts(rec.updated_ns),
        last_error,
    })
}

fn count_dead(txn: &redb::ReadTransaction, name: &str) -> Result<u64, StorageError> {
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

pub(crate) fn subscribe(
    shared: &Arc<Shared>,
    name: &str,
    filter: Filter,
    start: Position,
    handler: Box<dyn Handler>,
) -> Result<DurableSubscription, SubscribeError> {
    if !valid_name(name) {
        return Err(SubscribeError::InvalidName(name.to_owned()));
    }
    if shared.closed.load(Ordering::Acquire) {
        return Err(SubscribeError::Closed);
    }
    let mut map = shared.durable.lock();
    if map.contains_key(name) {
        return Err(SubscribeError::AlreadyActive(name.to_owned()));
    }
    let filter_json = serde_json::to_string(&filter).unwrap_or_else(|_| "{}".into());
    let now = now_ns();
    let txn = shared.db.begin_read().map_err(StorageError::from)?;
    let existing: Option<CursorRecord> = {
        let cursors = txn.open_table(CURSORS).map_err(StorageError::from)?;
        match cursors.get(name).map_err(StorageError::from)? {
            Some(v) => Some(from_bytes(v.value(), "cursors", name)?),
            None => None,
        }
    };
    let mut record = match existing {
        Some(rec) => rec,
        None => {
            let first = resolve(&txn, start).map_err(|e| match e {
                ReadError::UnknownEvent(id) => SubscribeError::UnknownPosition(id.to_string()),
                ReadError::Storage(s) => SubscribeError::Storage(s),
                ReadError::Closed => SubscribeError::Closed,
            })?;
            CursorRecord {
                filter_json: String::new(),
                delivered: first - 1,
                missed: 0,
                created_ns: now,
                updated_ns: now,
            }
        }
    };
    drop(txn);
    record.filter_json = filter_json;
    record.updated_ns = now;
    let wtxn = super::txn::write(shared)?;
    {
        let mut cursors = wtxn.open_table(CURSORS).map_err(StorageError::from)?;
        cursors
            .insert(name, to_bytes(&record).as_slice())
            .map_err(StorageError::from)?;
    }
    wtxn.commit().map_err(StorageError::from)?;
    let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
    let sub = Arc::new(DurableSub {
        name: name.to_owned(),
        id: SubscriptionId(shared.live.reserve_id()),
        filter,
        handler,
        delivered: AtomicU64::new(record.delivered),
        stored: AtomicU64::new(record.delivered),
        durable_at: AtomicU64::new(record.delivered),
        record: Mutex::new(record),
        live: AtomicBool::new(false),
        live_from: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        pending_attempts: AtomicU32::new(0),
        last_error: Mutex::new(None),
        wake_tx,
        wake_rx,
        worker: Mutex::new(None),
    });
    let worker_sub = sub.clone();
    let worker_shared = shared.clone();
    let worker = std::thread::Builder::new()
        .name(format!("ctrlbus-sub-{name}"))
        .spawn(move || worker_sub.run(worker_shared))
        .map_err(|e| SubscribeError::Storage(StorageError::Redb(redb::Error::Io(e))))?;
    *sub.worker.lock() = Some(worker);
    map.insert(name.to_owned(), sub.clone());
    Ok(DurableSubscription {
        sub,
        shared: Arc::downgrade(shared),
    })
}

fn check_inactive(shared: &Shared, name: &str) -> Result<(), CursorError> {
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
    let txn = super::txn::write(shared)?;
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
    let txn = super::txn::write(shared)?;
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
