//! The publisher's side of a group commit: validating and encoding on the
//! caller's thread, queueing, and waiting for the outcome (`Pending`),
//! leading the commit when no one else does.

use super::*;

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
    let _span =
        tracing::debug_span!("publish", events = events.len(), first_id = %events[0].id).entered();
    submit_as(shared, events, Waiter::Now)?.wait()
}

/// Who will wait for a blocking publish, which decides whether the writer
/// thread must be woken to commit it should nobody else.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Waiter {
    /// The submitting thread, at once (`publish`): it leads the commit
    /// itself if nobody else does, so waking the writer thread would only
    /// cost two context switches per group (at 1 publisher, 30% of the
    /// process's CPU; BENCHMARKS.md, "Seventh session").
    Now,
    /// The caller, whenever it calls `wait` (`submit`): the writer thread
    /// commits it after `LINGER` if no publisher has.
    Later,
}

/// A publish handed to the writer, not yet waited for.
///
/// Invariant: `rx` is `Some` until `wait` takes it; dropping an unwaited
/// publish waits for it (so its group is fanned out in order).
pub(crate) struct Pending {
    shared: Arc<Shared>,
    rx: Option<ReplyReceiver>,
    /// When it was submitted (`ctrlbus_publish_seconds`).
    submitted: Instant,
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
                Waited::Woken => {}
            }
        };
        let mut outcome = reply.ok_or(PublishError::Closed)??;
        for w in outcome.wake.drain(..) {
            w.wake();
        }
        let mut done = None;
        if let Some(group) = &outcome.group {
            fan_out(shared);
            // A publish from inside a handler can't wait for the fan-out
            // it is part of.
            if !DISPATCHING.get() {
                group.wait();
                done = Some(&**group);
            }
        }
        crate::telemetry::published(self.submitted.elapsed());
        Ok(receipts(std::mem::take(&mut outcome.seqs), done))
    }
}

/// The receipts of one request; with its group once fanned out, the
/// handler failures on its own events.
pub(super) fn receipts(seqs: Vec<Assigned>, group: Option<&Group>) -> Vec<Receipt> {
    let mut failures: Vec<(u64, HandlerFailure)> = Vec::new();
    if let Some(group) = group {
        let all = group.failures.lock();
        if !all.is_empty() {
            let mine: HashSet<u64> = seqs
                .iter()
                .filter(|s| !s.duplicate)
                .map(|s| s.seq)
                .collect();
            failures = all
                .iter()
                .filter(|(s, _)| mine.contains(s))
                .cloned()
                .collect();
        }
    }
    seqs.into_iter()
        .map(|a| Receipt {
            seq: a.seq,
            id: a.id,
            duplicate: a.duplicate,
            handler_failures: failures
                .iter()
                .filter(|(s, _)| *s == a.seq)
                .map(|(_, f)| f.clone())
                .collect(),
        })
        .collect()
}

/// Validates and encodes events on the caller's thread and hands them to the
/// writer; the returned [`Pending`] waits for the outcome.
pub(crate) fn submit(shared: &Arc<Shared>, events: Vec<Event>) -> Result<Pending, PublishError> {
    submit_as(shared, events, Waiter::Later)
}

fn submit_as(
    shared: &Arc<Shared>,
    events: Vec<Event>,
    waiter: Waiter,
) -> Result<Pending, PublishError> {
    let (items, bytes) = prepare(shared, events)?;
    let (reply, rx) = oneshot();
    let submitted = Instant::now();
    enqueue(
        shared,
        items,
        bytes,
        Reply::Blocking(reply),
        waiter == Waiter::Later,
        submitted,
    );
    Ok(Pending {
        shared: shared.clone(),
        rx: Some(rx),
        submitted,
    })
}

/// Validates and encodes events on the caller's thread and queues them for
/// the writer thread, which commits them at once (no publisher leads an
/// async publish's commit: its thread is a runtime's); `rx` completes once
/// they are durable and fanned out (`completion`).
#[cfg(feature = "tokio")]
pub(crate) fn submit_async(
    shared: &Arc<Shared>,
    events: Vec<Event>,
) -> Result<crate::sync::AsyncReceiver<Result<Vec<Receipt>, PublishError>>, PublishError> {
    let _span = tracing::debug_span!("publish_async", events = events.len()).entered();
    let submitted = Instant::now();
    let (items, bytes) = prepare(shared, events)?;
    shared.completions.start(shared)?;
    let (reply, rx) = crate::sync::async_oneshot();
    enqueue(
        shared,
        items,
        bytes,
        Reply::Async(reply, submitted),
        true,
        submitted,
    );
    // Queued after the writer thread shut down (a close racing this
    // call): nobody will commit it, so it is refused, as a waiting
    // blocking publisher refuses what it finds queued then. `try_lock`
    // fails only while a committer holds the core, which then exists.
    if shared.core.try_lock().is_some_and(|core| core.is_none()) {
        refuse_queued(shared);
    }
    Ok(rx)
}

/// Checks and encodes a request's events: (the records, their bytes in a
/// WAL frame).
fn prepare(shared: &Shared, events: Vec<Event>) -> Result<(Vec<Prepared>, usize), PublishError> {
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
    // The payloads' JSON, one after the other, in a buffer this thread
    // keeps: each record then costs one allocation of its exact size.
    let mut payload = PAYLOAD_JSON.take();
    for event in events {
        event.validate_but_size()?;
        payload.clear();
        if !event.payload.is_empty() {
            crate::compact_json::write_object(&event.payload, &mut payload);
            if payload.len() > shared.opts.max_payload_bytes {
                return Err(PublishError::Invalid(crate::EventError::PayloadTooLarge {
                    limit: shared.opts.max_payload_bytes,
                }));
            }
        }
        let mut record = Vec::new();
        codec::encode(&event, 0, &payload, &mut record);
        bytes += record.len() + 4;
        items.push(Prepared { event, record });
    }
    if payload.capacity() <= MAX_KEPT_PAYLOAD_JSON {
        PAYLOAD_JSON.set(payload);
    }
    if bytes > shared.opts.max_batch_bytes {
        return Err(PublishError::BatchTooLarge {
            limit: shared.opts.max_batch_bytes,
            size: bytes,
        });
    }
    Ok((items, bytes))
}

thread_local! {
    /// `prepare`'s payload JSON buffer, kept between publishes.
    static PAYLOAD_JSON: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The largest payload JSON buffer a thread keeps (a 1 MiB payload once
/// should not hold a megabyte per thread forever).
const MAX_KEPT_PAYLOAD_JSON: usize = 64 << 10;

/// Queues a request. A blocking publisher may lead its own commit, so the
/// writer thread waits `LINGER` for it; nobody leads an async one, so the
/// writer commits it at once. With `wake_writer` false the writer thread is not
/// woken: the caller waits at once and leads the commit itself. `now` is
/// when it was submitted.
fn enqueue(
    shared: &Shared,
    items: Vec<Prepared>,
    bytes: usize,
    reply: Reply,
    wake_writer: bool,
    now: Instant,
) {
    let due = if reply.has_leader() {
        now + LINGER
    } else {
        now
    };
    let led = reply.has_leader();
    let kick = {
        let mut q = shared.queue.lock();
        q.reqs.push(PublishReq {
            items,
            bytes,
            reply,
            due,
        });
        // A committer waiting for the rest of its group wakes once it is
        // all here, not at every arrival.
        if q.gather_until > 0 && q.reqs.len() >= q.gather_until {
            q.gather_until = 0;
            shared.queue_grew.notify_one();
        }
        // An async publish is due at once; a submitted one within LINGER,
        // which a watching writer thread sees without being woken.
        let kick = wake_writer && (!led || !q.writer_watching);
        q.writer_watching |= kick;
        kick
    };
    if kick {
        // The writer thread is the committer of last resort.
        let _ = shared.tx.send(WriteReq::Kick);
    }
}
