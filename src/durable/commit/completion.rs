//! Completing async publishes (`publish_async`): the thread that fans out
//! their groups and then wakes their futures.
//!
//! A blocking publisher fans out its own group on its thread after the
//! commit. An async publisher's thread belongs to a runtime, which must not
//! run handlers or wait for another thread's fan-out, so the committer hands
//! the answer here instead: one thread per bus (started by the first async
//! publish), not one per call. It takes the fan-out baton like any
//! publisher (`fan_out`), waits until each group is dispatched, and only
//! then completes the future with its receipts, so `publish_async` resolves
//! at the same point as `publish` (durable, caught-up subscribers run).
//!
//! Invariants:
//! - Every `Completion` pushed before `stop` is answered: the thread drains
//!   the queue before it exits, and `Handle::close` stops it only after the
//!   writer thread, the last to push, has exited.
//! - A future dropped before it is answered changes nothing: the group is
//!   fanned out all the same (fan-out of later groups waits for it).

use std::thread::JoinHandle;

use super::*;
use crate::sync::AsyncSender;

/// An async publish committed and waiting for its group's fan-out.
pub(super) struct Completion {
    pub(super) reply: AsyncSender<Result<Vec<Receipt>, PublishError>>,
    pub(super) seqs: Vec<Assigned>,
    pub(super) group: Arc<Group>,
    pub(super) submitted: Instant,
}

#[derive(Default)]
struct Queue {
    items: Vec<Completion>,
    /// Set by `stop`: exit once the queue is empty.
    stop: bool,
    /// Set once the thread has been started (it is started once).
    started: bool,
}

/// The completion thread's queue and handle (in `Shared`).
#[derive(Default)]
pub(crate) struct Completions {
    /// Set once the thread runs: every async publish looks here before
    /// taking the queue's lock.
    running: std::sync::atomic::AtomicBool,
    queue: Mutex<Queue>,
    ready: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Completions {
    /// Starts the thread unless it runs.
    ///
    /// # Errors
    /// [`PublishError::Closed`] once stopped; [`PublishError::Storage`] if
    /// the thread can't be spawned.
    pub(crate) fn start(&self, shared: &Arc<Shared>) -> Result<(), PublishError> {
        if self.running.load(Ordering::Acquire) {
            // A publish after `stop` is refused by the bus's closed flag
            // before it gets here, and its request answered by the writer.
            return Ok(());
        }
        let mut q = self.queue.lock();
        if q.stop {
            return Err(PublishError::Closed);
        }
        if q.started {
            return Ok(());
        }
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("ctrlbus-complete".into())
            .spawn(move || run(&s))
            .map_err(|e| PublishError::Storage(StorageError::Redb(redb::Error::Io(e))))?;
        q.started = true;
        *self.thread.lock() = Some(handle);
        self.running.store(true, Ordering::Release);
        Ok(())
    }

    /// Queues a committed async publish for completion after its fan-out.
    pub(super) fn push(&self, c: Completion) {
        self.queue.lock().items.push(c);
        self.ready.notify_one();
    }

    /// Answers what is queued, then ends the thread (called by
    /// `Handle::close` once the writer thread has exited).
    pub(crate) fn stop(&self) {
        self.queue.lock().stop = true;
        self.ready.notify_one();
        let handle = self.thread.lock().take();
        if let Some(h) = handle
            && h.thread().id() != std::thread::current().id()
        {
            let _ = h.join();
        }
    }
}

fn run(shared: &Shared) {
    let _dart = PoisonDart::new(&shared.poisoned, "ctrlbus-complete");
    let completions = &shared.completions;
    loop {
        let batch = {
            let mut q = completions.queue.lock();
            while q.items.is_empty() && !q.stop {
                completions.ready.wait(&mut q);
            }
            if q.items.is_empty() {
                return;
            }
            std::mem::take(&mut q.items)
        };
        fan_out(shared);
        for c in batch {
            // Dispatched by this thread just now, or by the publisher
            // holding the baton.
            c.group.wait();
            crate::telemetry::published(c.submitted.elapsed());
            c.reply
                .send(Ok(super::publish::receipts(c.seqs, Some(&c.group))));
        }
    }
}
