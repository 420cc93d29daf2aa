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
//! `ack_flush_interval` when idle, and as soon as the last event a
//! subscription handed its consumer (`handled`) is `ack_flush_events` past
//! `durable_at`, in which case the delivering thread (the catch-up worker,
//! or the fan-out dispatcher after a live group) waits until it is durable.
//! So after a crash a subscription sees again at most the events it handled
//! after its last durable position: fewer than `ack_flush_events` plus one
//! commit group. Passing events its filter doesn't want moves `delivered`
//! but never makes a thread wait: nothing is seen again for them.

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
use super::event_blocks::{EventTables, RowError};
use super::read::{self, Position, resolve, resolve_in};
use super::read_tail::Snapshot;
use super::tables::{CURSORS, CursorRecord, DEAD_LETTERS, DeadLetterRecord, from_bytes, to_bytes};
use crate::bus::{Handler, HandlerFailure, SubscriptionId};
use crate::error::{CursorError, ReadError, StorageError, SubscribeError};
use crate::event::Event;
use crate::fanout;
use crate::filter::Filter;
use crate::sync::Mutex;
use crate::time::{now_ns, ts};

mod cursors;

pub use cursors::{CursorInfo, CursorState, DeadLetter};
pub(crate) use cursors::{dead_letters, delete, get_cursor, list_cursors, seek};

/// Longest subscription name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Who handles a durable subscription's events.
pub(crate) enum Consumer {
    /// A handler, run live inside `publish` while caught up.
    Handler(Box<dyn Handler>),
    /// A consumer that waits for its own verdict on each event (an async
    /// stream): never live, so it never holds up a publisher; it reads
    /// applied events from the log on the subscription's thread, woken by
    /// each apply.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    Pull(Box<dyn Pull>),
}

/// What a [`Pull`] consumer decided about one event.
#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
pub(crate) enum Verdict {
    /// Handled: the position moves past it.
    Ack,
    /// Not handled: delivered again after `retry_after` (else the
    /// subscription's backoff), and dead-lettered after `max_deliveries`.
    Nack {
        error: String,
        retry_after: Option<Duration>,
    },
    /// The consumer is gone: the subscription stops here, the event
    /// unhandled and its attempt not counted.
    Closed,
}

/// A consumer that pulls events (see [`Consumer::Pull`]).
pub(crate) trait Pull: Send + Sync {
    /// Offers the event at `seq` (its `attempt`-th delivery, from 1) and
    /// waits for the verdict.
    fn deliver(&self, seq: u64, event: &Event, attempt: u32) -> Verdict;
    /// The position now includes `seq` (acknowledged or dead-lettered).
    fn recorded(&self, seq: u64);
    /// Reading the log failed (it is retried); tells the consumer.
    fn read_failed(&self, error: &ReadError);
    /// The subscription is stopping: a delivery waiting for its verdict
    /// returns [`Verdict::Closed`].
    fn stop(&self);
    /// The subscription's thread ended: nothing more comes.
    fn finished(&self);
}

impl<P: Pull + ?Sized> Pull for Arc<P> {
    fn deliver(&self, seq: u64, event: &Event, attempt: u32) -> Verdict {
        (**self).deliver(seq, event, attempt)
    }
    fn recorded(&self, seq: u64) {
        (**self).recorded(seq);
    }
    fn read_failed(&self, error: &ReadError) {
        (**self).read_failed(error);
    }
    fn stop(&self) {
        (**self).stop();
    }
    fn finished(&self) {
        (**self).finished();
    }
}

/// A record read while catching up: the event, if the filter wants it
/// (`None` if not), or why its block or record can't be read.
type Fetched = Result<Option<Event>, String>;

/// One active durable subscription.
pub(crate) struct DurableSub {
    pub(crate) name: String,
    pub(crate) id: SubscriptionId,
    pub(crate) filter: Filter,
    consumer: Consumer,
    delivered: AtomicU64,
    /// The last `seq` handed to the consumer and handled (`<= delivered`).
    handled: AtomicU64,
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
    /// The delay before redelivering it that the failed live delivery's
    /// handler asked for (`HandlerError::retry_after`).
    pending_delay: Mutex<Option<Duration>>,
    last_error: Mutex<Option<String>>,
    /// Its `ctrlbus_subscription_lag_events`.
    lag: crate::telemetry::LagGauge,
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
        let Consumer::Handler(handler) = &self.consumer else {
            return; // never live
        };
        if !self.live.load(Ordering::Acquire)
            || seq < self.live_from.load(Ordering::Acquire)
            || !self.filter.matches(event)
        {
            return;
        }
        let started = Instant::now();
        match fanout::call_for_retry(self.id, handler.as_ref(), event).map_err(|(f, delay)| {
            *self.pending_delay.lock() = delay;
            f
        }) {
            Ok(()) => {
                self.delivered.store(seq, Ordering::Release);
                self.handled.store(seq, Ordering::Release);
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
            self.report_lag(shared);
            // Wait until the position is durable, as catch-up does. Only
            // asking for a flush let the dispatcher run further groups
            // before the writer stored the position, so a crash could
            // redeliver more than the documented window. Counted from the
            // last event handled: groups of events the filter doesn't want
            // are redelivered to nobody, and waiting for them held up every
            // publisher (200 live subscriptions of other tenants: 0.90 of
            // the rate beside one).
            if self
                .handled
                .load(Ordering::Acquire)
                .saturating_sub(self.durable_at.load(Ordering::Acquire))
                >= shared.opts.ack_flush_events
            {
                let _ = commit::flush_acks(shared, Duration::from_secs(30));
            }
        }
    }

    /// Sets `ctrlbus_subscription_lag_events` for this subscription.
    pub(crate) fn report_lag(&self, shared: &Shared) {
        self.lag.set(
            shared
                .last_seq
                .load(Ordering::Acquire)
                .saturating_sub(self.position()),
        );
    }

    fn detach(&self, shared: &Shared) {
        self.live.store(false, Ordering::Release);
        shared.fan.lock().live_durable.remove(self.id);
        let _ = self.wake_tx.try_send(());
    }

    /// Every event up to this `seq` has been handled.
    pub(crate) fn position(&self) -> u64 {
        self.delivered.load(Ordering::Acquire)
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
        if let Consumer::Pull(pull) = &self.consumer {
            pull.stop();
        }
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
                Ok(false) if matches!(self.consumer, Consumer::Pull(_)) => {
                    // Woken by the fan-out of the next group it wants (the
                    // wake waits in the channel if it came first); the
                    // timeout is a safety net, and moves the position past
                    // what it doesn't want (`PullWakers`).
                    let _ = self.wake_rx.recv_timeout(Duration::from_millis(500));
                }
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
                    if let Consumer::Pull(pull) = &self.consumer {
                        pull.read_failed(&e);
                    }
                    *self.last_error.lock() = Some(e.to_string());
                    self.sleep(shared.opts.max_retry_backoff);
                }
            }
        }
        // Store the final position, durably.
        if self.delivered.load(Ordering::Acquire) != self.durable_at.load(Ordering::Acquire) {
            let _ = commit::flush_acks(&shared, Duration::from_secs(10));
        }
        if let Consumer::Pull(pull) = &self.consumer {
            pull.finished();
        }
    }

    /// Delivers a chunk from the log; `Ok(true)` if it made progress and more
    /// may follow, `Ok(false)` if caught up with the fan-out position.
    fn catch_up(&self, shared: &Shared) -> Result<bool, ReadError> {
        const CHUNK: usize = 512;
        // Through what has been fanned out (pull subscriptions too: the
        // fan-out wakes them for each group they want, and what the file
        // does not hold yet is read from memory).
        let from = self.delivered.load(Ordering::Acquire) + 1;
        let (target, clean) = {
            let fan = shared.fan.lock();
            let clean = match self.consumer {
                Consumer::Pull(_) => {
                    fan.pull_wakers
                        .clean_through(self.id, self.filter.tenant_id.as_deref(), from)
                }
                Consumer::Handler(_) => None,
            };
            (fan.next_seq - 1, clean)
        };
        if from > target {
            return Ok(false);
        }
        if let Some(through) = clean {
            // The fan-out judged every event from `from` to `through`
            // against the filter and none was wanted (`PullWakers`): pass
            // them without reading. (Retention may have removed some of
            // them; unwanted, they don't count as `missed`.)
            self.delivered.store(through.min(target), Ordering::Release);
            self.report_lag(shared);
            return Ok(true);
        }
        // Read a chunk into memory, so no read transaction is held while
        // handlers run (a long-held one would pin old pages of the file).
        // Events acknowledged through the WAL and not in the file yet come
        // from memory (`read_tail`): catching up never waits for, or
        // forces, an apply (it used to, once per chunk).
        let mut batch: Vec<(u64, Fetched)> = Vec::with_capacity(CHUNK);
        // A record that can't be decoded (disk corruption) is dead-lettered
        // below with its reason, never retried forever (G11); one whose
        // filter fields decode is judged by them first, and only what the
        // filter wants is made an event.
        let judge = |bytes: &[u8]| -> Fetched {
            codec::decode_ref(bytes).and_then(|(_, rec)| {
                if self
                    .filter
                    .matches_parts(rec.event_type, rec.tenant_id, rec.instance())
                {
                    rec.to_event().map(Some)
                } else {
                    Ok(None)
                }
            })
        };
        {
            let (txn, snap) = Snapshot::begin(shared)?;
            let events = EventTables::read(&txn)?;
            let in_file = target.min(snap.applied);
            if from <= in_file {
                let mut rows = events.rows(from, in_file, false)?;
                while batch.len() < CHUNK
                    && let Some(row) = rows.next()
                {
                    match row {
                        Ok((seq, bytes)) => batch.push((seq, judge(bytes))),
                        Err(e @ RowError::Damaged { seq, .. }) => {
                            batch.push((seq, Err(StorageError::from(e).to_string())));
                        }
                        Err(RowError::Storage(e)) => return Err(e.into()),
                    }
                }
            }
            let room = CHUNK - batch.len();
            batch.extend(
                snap.records_from(from)
                    .take_while(|(seq, _)| *seq <= target)
                    .take(room)
                    .map(|(seq, r)| (seq, judge(r))),
            );
        }
        let mut expected = from;
        for (seq, decoded) in batch {
            if self.stopped() {
                return Ok(true);
            }
            if seq > expected {
                // Removed by retention before we got there.
                self.record.lock().missed += seq - expected;
                tracing::warn!(subscription = %self.name, missed = seq - expected, "events removed by retention were skipped");
            }
            expected = seq + 1;
            // An event the filter doesn't want was never handed over: no
            // ack waits for it, and passing it is not worth a flush of the
            // position by count (the applier's timed flush stores it).
            let handed = !matches!(decoded, Ok(None));
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
            if !handed {
                continue;
            }
            self.handled.store(seq, Ordering::Release);
            if let Consumer::Pull(pull) = &self.consumer {
                pull.recorded(seq);
            }
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
        self.report_lag(shared);
        Ok(true)
    }

    /// Delivers one event until it succeeds or is dead-lettered. False if
    /// the subscription was stopped first.
    fn deliver_with_retry(&self, shared: &Shared, seq: u64, event: &Event) -> bool {
        let mut attempt = self.pending_attempts.swap(0, Ordering::AcqRel);
        let mut backoff = shared.opts.retry_backoff;
        let mut asked: Option<Duration> = self.pending_delay.lock().take();
        loop {
            // A failed live delivery counts as an attempt: once
            // `max_deliveries` are used up, dead-letter without delivering
            // again.
            let exhausted = attempt >= shared.opts.max_deliveries;
            if attempt > 0 && !exhausted {
                // The delay the consumer asked for, else the backoff.
                if let Some(d) = asked.take() {
                    self.sleep(d);
                } else {
                    self.sleep(backoff);
                    backoff = (backoff * 2).min(shared.opts.max_retry_backoff);
                }
            }
            if self.stopped() {
                self.pending_attempts.store(attempt, Ordering::Release);
                return false;
            }
            let error = if exhausted {
                self.last_error.lock().clone().unwrap_or_default()
            } else {
                attempt += 1;
                match self.call(seq, event, attempt) {
                    Verdict::Ack => return true,
                    Verdict::Nack { error, retry_after } => {
                        asked = retry_after;
                        error
                    }
                    Verdict::Closed => {
                        self.stop.store(true, Ordering::Release);
                        self.pending_attempts.store(attempt - 1, Ordering::Release);
                        return false;
                    }
                }
            };
            *self.last_error.lock() = Some(error.clone());
            if attempt >= shared.opts.max_deliveries {
                return self.dead_letter(shared, seq, error, attempt);
            }
        }
    }

    /// One delivery of the event at `seq` to the consumer.
    fn call(&self, seq: u64, event: &Event, attempt: u32) -> Verdict {
        match &self.consumer {
            Consumer::Handler(h) => match fanout::call_for_retry(self.id, h.as_ref(), event) {
                Ok(()) => Verdict::Ack,
                Err((f, retry_after)) => Verdict::Nack {
                    error: f.error,
                    retry_after,
                },
            },
            Consumer::Pull(p) => p.deliver(seq, event, attempt),
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
            if let Some(Ok(())) = sent.ok().and_then(|()| rx.recv().ok()) {
                crate::telemetry::dead_lettered(&self.name);
                tracing::warn!(subscription = %self.name, seq, attempts, %error, "event moved to dead letters");
                return true;
            }
            self.delivered.store(seq - 1, Ordering::Release);
            if self.stopped() || shared.closed.load(Ordering::Acquire) {
                return false;
            }
            self.sleep(shared.opts.max_retry_backoff);
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
                let events = EventTables::read(&txn)?;
                match events.get(letter.seq)? {
                    None => None,
                    Some(b) => {
                        let (_, rec) = codec::decode_ref(b.bytes())
                            .map_err(|r| read::corrupted(letter.seq, r))?;
                        Some(rec.to_event().map_err(|r| read::corrupted(letter.seq, r))?)
                    }
                }
            };
            // The handler runs before the write transaction opens: user
            // code never holds the write lock (every publish waits on it).
            let outcome = event.map(
                |e| match self.sub.call(letter.seq, &e, letter.attempts + 1) {
                    Verdict::Ack => Ok(()),
                    Verdict::Nack { error, .. } => Err(error),
                    Verdict::Closed => Err("the consumer is closed".to_owned()),
                },
            );
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
                    Some(Err(error)) => {
                        let rec = DeadLetterRecord {
                            error,
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
            {
                let mut fan = shared.fan.lock();
                fan.live_durable.remove(self.sub.id);
                fan.pull_wakers.remove(self.sub.id);
            }
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

pub(crate) fn subscribe(
    shared: &Arc<Shared>,
    name: &str,
    filter: Filter,
    start: Position,
    consumer: Consumer,
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
    // The start may name events acknowledged through the WAL and not in
    // the file yet: resolved over the file and memory (`read_tail`).
    let (txn, snap) = Snapshot::begin(shared)?;
    let existing: Option<CursorRecord> = {
        let cursors = txn.open_table(CURSORS).map_err(StorageError::from)?;
        match cursors.get(name).map_err(StorageError::from)? {
            Some(v) => Some(from_bytes(v.value(), "cursors", name)?),
            None => None,
        }
    };
    let mut record = if let Some(rec) = existing {
        rec
    } else {
        let first = resolve_in(&txn, &snap, start).map_err(|e| match e {
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
        consumer,
        delivered: AtomicU64::new(record.delivered),
        handled: AtomicU64::new(record.delivered),
        stored: AtomicU64::new(record.delivered),
        durable_at: AtomicU64::new(record.delivered),
        record: Mutex::new(record),
        live: AtomicBool::new(false),
        live_from: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        pending_attempts: AtomicU32::new(0),
        pending_delay: Mutex::new(None),
        last_error: Mutex::new(None),
        lag: crate::telemetry::LagGauge::new(name),
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
    if matches!(sub.consumer, Consumer::Pull(_)) {
        shared
            .fan
            .lock()
            .pull_wakers
            .add(sub.id, sub.filter.clone(), sub.wake_tx.clone());
    }
    map.insert(name.to_owned(), sub.clone());
    Ok(DurableSubscription {
        sub,
        shared: Arc::downgrade(shared),
    })
}
