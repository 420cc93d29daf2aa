//! The applier: moves acknowledged groups from memory (and the WAL) into the
//! redb file, with the append hooks, the dead letters and the
//! subscriptions' positions, in one durable commit every `apply_interval`;
//! runs retention. With a WAL it runs on its own thread (`ctrlbus-apply`);
//! without one, inline in the committer.

use super::*;

/// Events durable in the WAL but not yet in the redb file.
///
/// It holds the records, not the events: the events (their strings and
/// payload maps) are freed by the publisher thread that made them once the
/// group is fanned out, not by this thread, which cost the publisher's
/// allocator its slow path (frees from another thread) and this thread the
/// drops (BENCHMARKS.md, "Eighth session"). The append hooks still get
/// the events: kept when a hook may want them at commit
/// (`AppendHook::may_want_events`: a webhook is active), else decoded from
/// the records if one wants them by the apply (`wants_events`).
pub(super) struct Unapplied {
    /// The `seq` of `records[0]`; the others follow without a gap.
    pub(super) first: u64,
    /// The `seq` of the last record.
    pub(super) last: u64,
    /// Each record's event id (`id_key`), for the id index.
    pub(super) ids: Vec<u128>,
    /// The group, with its events, if an append hook may have wanted them
    /// when it was committed.
    pub(super) group: Option<Arc<Group>>,
    /// Shared with reads until applied (`read_tail`).
    pub(super) records: Arc<Vec<Vec<u8>>>,
    /// Bytes of `records` (what `Shared::unapplied_bytes` counts).
    pub(super) bytes: u64,
    pub(super) append_ns: i64,
    /// When the writer acknowledged it: `apply_interval` counts from here.
    pub(super) acked_at: Instant,
}

/// The events of a group committed when no append hook wanted them, for
/// one that does by the apply: decoded from its records.
fn decode_group(u: &Unapplied) -> Result<Vec<(u64, Event)>, StorageError> {
    (u.first..)
        .zip(u.records.iter())
        .map(|(seq, record)| {
            codec::decode_ref(record)
                .and_then(|(_, r)| r.to_event())
                .map(|e| (seq, e))
                .map_err(|reason| StorageError::CommitFailed {
                    reason: format!("the record of seq {seq} doesn't decode: {reason}"),
                })
        })
        .collect()
}

/// What the writer tells the applier (groups go through the shared queue,
/// which does not wake it: the applier works on its own cadence).
pub(super) enum ApplyMsg {
    /// `FlushAcks`, `DeadLetter` or `Apply`: apply now, then answer.
    Now(WriteReq),
    /// The unapplied groups passed `SOFT_UNAPPLIED_BYTES`: apply now,
    /// before the writer has to wait for it at `MAX_UNAPPLIED_BYTES`.
    Soon,
    Shutdown,
}

/// Groups handed from the writer to the applier, in `seq` order.
pub(super) type ApplyQueue = Arc<Mutex<Vec<Unapplied>>>;

/// Applies acknowledged groups, dead letters and subscription positions to
/// the redb file, in durable commits; runs retention.
pub(super) struct Applier {
    shared: Arc<Shared>,
    /// Groups acknowledged, not yet applied; in `seq` order.
    unapplied: Vec<Unapplied>,
    unapplied_events: usize,
    oldest_unapplied: Option<Instant>,
    last_flush: Instant,
    last_retention: Instant,
    /// A retention pass has more chunks to remove.
    retaining: bool,
    /// A WAL holds the acknowledged groups (so a failed apply loses
    /// nothing, and reopening recovers them).
    wal_backed: bool,
    /// Bytes of `unapplied` that the committer counted in
    /// `Shared::unapplied_bytes` (taken off once applied).
    counted_bytes: u64,
}

impl Applier {
    pub(super) fn new(shared: Arc<Shared>, wal_backed: bool) -> Applier {
        Applier {
            shared,
            wal_backed,
            counted_bytes: 0,
            unapplied: Vec::new(),
            unapplied_events: 0,
            oldest_unapplied: None,
            last_flush: Instant::now(),
            last_retention: Instant::now(),
            retaining: false,
        }
    }

    pub(super) fn push(&mut self, u: Unapplied) {
        self.unapplied_events += u.records.len();
        self.oldest_unapplied.get_or_insert(u.acked_at);
        self.unapplied.push(u);
    }

    /// How long to wait for work before the next timed apply or flush.
    pub(super) fn timeout(&self) -> Duration {
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
    pub(super) fn tick(&mut self, others: Vec<WriteReq>, force: bool) {
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
    pub(super) fn run(mut self, rx: Receiver<ApplyMsg>, queue: ApplyQueue) {
        let shared = self.shared.clone();
        let _dart = PoisonDart::new(&shared.poisoned, "ctrlbus-apply");
        let cadence = self
            .shared
            .opts
            .apply_interval
            .min(self.shared.opts.ack_flush_interval);
        loop {
            let mut others = Vec::new();
            let (mut shutdown, mut soon) = (false, false);
            let mut take = |msg: ApplyMsg| match msg {
                ApplyMsg::Now(req) => {
                    others.push(req);
                    false
                }
                ApplyMsg::Soon => {
                    soon = true;
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
                self.counted_bytes += u.bytes;
                self.push(u);
            }
            self.tick(others, shutdown || soon);
            if shutdown {
                break;
            }
        }
    }

    /// Background retention, one chunk per tick: a pass that has more to
    /// remove goes on at the next tick (every `apply_interval` at most),
    /// with applies between, so the applier (and every read waiting for
    /// it) never waits on more than one chunk.
    pub(super) fn maybe_retain(&mut self) {
        if let Some(policy) = self.shared.opts.retention.clone()
            && (self.retaining
                || self.last_retention.elapsed() >= self.shared.opts.retention_interval)
        {
            if !self.retaining {
                // A pass starts from everything acknowledged; its later
                // chunks leave applying to `tick`'s own schedule (no extra
                // commit per chunk).
                self.last_retention = Instant::now();
                self.apply(Vec::new());
            }
            match upkeep::retain_chunk(&self.shared, &policy) {
                Ok(chunk) => self.retaining = chunk.removed >= upkeep::RETAIN_CHUNK,
                Err(e) => {
                    self.retaining = false;
                    tracing::warn!(error = %e, "retention failed");
                }
            }
        }
    }

    /// Hands every unapplied group's events to the append hooks, in the
    /// apply's transaction: the kept events, or for a group not kept,
    /// decoded from its records if any hook wants events now.
    fn run_hooks(&self, txn: &redb::WriteTransaction) -> Result<(), StorageError> {
        let hooks = self.shared.hooks.read();
        if hooks.is_empty() {
            return Ok(());
        }
        // Asked once per apply, and only if a group's events were not kept.
        let mut decode = false;
        if self.unapplied.iter().any(|u| u.group.is_none()) {
            for hook in hooks.iter() {
                decode |= hook.wants_events(txn)?;
            }
        }
        for u in &self.unapplied {
            let decoded: Vec<(u64, Event)>;
            let appended: Vec<(u64, &Event)> = match &u.group {
                Some(g) => g.events.iter().map(|(s, e)| (*s, e)).collect(),
                None if decode => {
                    decoded = decode_group(u)?;
                    decoded.iter().map(|(s, e)| (*s, e)).collect()
                }
                None => continue,
            };
            for hook in hooks.iter() {
                hook.on_append(txn, &appended, u.append_ns)?;
            }
        }
        Ok(())
    }

    /// Applies every unapplied group to redb, with the hooks, the dead letters
    /// in `others` and the subscriptions' positions, in one durable commit.
    /// True on success. A failure poisons the bus when a WAL holds the
    /// events (reopening recovers them from it).
    pub(super) fn apply(&mut self, others: Vec<WriteReq>) -> bool {
        let shared = self.shared.clone();
        let _span = tracing::debug_span!(
            "apply",
            groups = self.unapplied.len(),
            last_seq = self.unapplied.last().map(|u| u.last),
        )
        .entered();
        if shared.poisoned.load(Ordering::Acquire) {
            fail_all(Vec::new(), others, || StorageError::Poisoned);
            return false;
        }
        let subs: Vec<Arc<DurableSub>> = shared.durable.lock().values().cloned().collect();
        let mut cursor_writes: Vec<(Arc<DurableSub>, u64)> = Vec::new();
        let result = (|| -> Result<(), StorageError> {
            // Not `txn::write`: the poison check was made above, and a
            // failed apply must still answer `others`.
            let txn = crate::durable::txn::begin(&shared)?;
            {
                let mut events = EventTables::write(&txn)?;
                let mut index = crate::durable::id_index::Indexer::open(&txn)?;
                for u in &self.unapplied {
                    for (seq, id) in (u.first..).zip(&u.ids) {
                        index.add(*id, seq)?;
                    }
                }
                index.finish()?;
                // Consecutive groups share blocks.
                events.append(
                    self.unapplied
                        .iter()
                        .flat_map(|u| (u.first..).zip(u.records.iter().map(Vec::as_slice))),
                )?;
            }
            self.run_hooks(&txn)?;
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
            let started = Instant::now();
            txn.commit()?;
            if !self.wal_backed {
                // Without a WAL this commit is what makes the group durable.
                crate::telemetry::fsync(started.elapsed());
            }
            Ok(())
        })();
        self.last_flush = Instant::now();
        if let Err(e) = result {
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
        } else {
            for (sub, delivered) in cursor_writes {
                sub.mark_stored(delivered);
            }
            for sub in &subs {
                sub.mark_durable();
            }
            let applied_any = !self.unapplied.is_empty();
            if let Some(u) = self.unapplied.last() {
                shared.applied_seq.store(u.last, Ordering::Release);
                // Reads find these in the file from now on.
                shared.tail.lock().release(u.last);
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
            let last = shared.last_seq.load(Ordering::Acquire);
            crate::telemetry::apply_lag(
                last.saturating_sub(shared.applied_seq.load(Ordering::Acquire)),
            );
            for sub in &subs {
                sub.report_lag(&shared);
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

fn acks_dirty(shared: &Shared) -> bool {
    shared.durable.lock().values().any(|s| s.ack_dirty())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::bus::Bus;
    use crate::durable::hooks::FnHook;
    use crate::durable::{DurableBus, Position};
    use crate::event::{Event, Type};
    use crate::filter::Filter;
    use crate::sync::Mutex;
    use std::sync::Arc;

    #[test]
    fn a_hook_gets_the_events_committed_before_and_after_it_was_registered() {
        let dir = tempfile::tempdir().unwrap();
        let bus = DurableBus::builder()
            .apply_interval(Duration::from_secs(3600))
            .open(dir.path().join("log.redb"))
            .unwrap();
        let event = |i: u64| {
            Event::new(Type::DEPLOY_STARTED, "t")
                .with_actor("bob")
                .with_payload_value("i", i)
                .with_payload_value("nested", serde_json::json!({"a": [1, 2]}))
        };
        // One apply first: the webhook hook then knows there are no
        // webhooks, so nothing wants the events of the next commit.
        let first = bus.publish(event(0)).unwrap();
        bus.sync_reads().unwrap();
        // Committed with no hook wanting events: the applier keeps only the
        // records, and decodes them for the hook registered after.
        let before = vec![event(1), event(2)];
        let r1 = bus.publish_batch(before.clone()).unwrap();
        // Keeps what it is handed.
        let seen: Arc<Mutex<Vec<(u64, Event, i64)>>> = Arc::default();
        let keep = seen.clone();
        bus.shared().hooks.write().push(Arc::new(FnHook(
            move |appended: &[(u64, &Event)], ns: i64| {
                keep.lock()
                    .extend(appended.iter().map(|(s, e)| (*s, (*e).clone(), ns)));
            },
        )));
        // Committed with the hook: the group's events are kept for it.
        let after = event(3);
        let r2 = bus.publish(after.clone()).unwrap();
        // The apply runs the hook.
        bus.sync_reads().unwrap();
        let log: Vec<_> = bus
            .read(Position::Beginning, &Filter::all())
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(log.len(), 4);
        assert_eq!(log[0].seq, first.seq);
        let seen = seen.lock().clone();
        let expected: Vec<(u64, Event)> = vec![
            (r1[0].seq, before[0].clone()),
            (r1[1].seq, before[1].clone()),
            (r2.seq, after),
        ];
        assert_eq!(
            seen.iter()
                .map(|(s, e, _)| (*s, e.clone()))
                .collect::<Vec<_>>(),
            expected
        );
        // Each with its record's append time.
        for ((_, _, ns), stored) in seen.iter().zip(&log[1..]) {
            let at = i128::from(*ns);
            assert_eq!(at, stored.appended_at.as_nanosecond(), "seq {}", stored.seq);
        }
    }
}
