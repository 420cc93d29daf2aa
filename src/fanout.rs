//! Synchronous fan-out to live subscribers, shared by both buses.
//!
//! Invariants:
//! - The subscriber list is copy-on-write: `publish` takes a snapshot (one
//!   reference-count increment under a read lock) and calls handlers with no
//!   lock held, so a handler may publish, subscribe or unsubscribe.
//! - The list keeps subscription order; `remove` takes out exactly the entry
//!   with that id, whatever the order of unsubscribes.
//! - A handler's error or panic is caught and reported; the remaining
//!   handlers still run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::bus::{Detach, Handler, HandlerFailure, SubscriptionId};
use crate::event::Event;
use crate::filter::Filter;
use crate::sync::RwLock;

/// One live subscriber.
pub(crate) struct Entry {
    pub(crate) id: SubscriptionId,
    pub(crate) filter: Filter,
    pub(crate) handler: Box<dyn Handler>,
    /// Cleared on unsubscribe, so a snapshot taken before it skips the entry.
    active: AtomicBool,
}

/// The live subscribers of one bus.
pub(crate) struct Subscribers {
    list: RwLock<Arc<Vec<Arc<Entry>>>>,
    next_id: AtomicU64,
}

impl Subscribers {
    pub(crate) fn new() -> Subscribers {
        Subscribers {
            list: RwLock::new(Arc::new(Vec::new())),
            next_id: AtomicU64::new(1),
        }
    }

    /// Adds a subscriber at the end.
    pub(crate) fn add(&self, filter: Filter, handler: Box<dyn Handler>) -> SubscriptionId {
        let id = SubscriptionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let entry = Arc::new(Entry {
            id,
            filter,
            handler,
            active: AtomicBool::new(true),
        });
        let mut list = self.list.write();
        let mut next = Vec::with_capacity(list.len() + 1);
        next.extend(list.iter().cloned());
        next.push(entry);
        *list = Arc::new(next);
        id
    }

    /// Takes an id for a subscriber that lives elsewhere (a durable one), so
    /// ids stay unique across both kinds.
    pub(crate) fn reserve_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Removes exactly the subscriber with `id`.
    ///
    /// The old list is dropped after the lock is released: it may hold the
    /// last reference to the handler, whose captured values may end other
    /// subscriptions (and so take this lock) when dropped.
    pub(crate) fn remove(&self, id: SubscriptionId) -> bool {
        let old = {
            let mut list = self.list.write();
            let Some(pos) = list.iter().position(|e| e.id == id) else {
                return false;
            };
            list[pos].active.store(false, Ordering::Release);
            let mut next: Vec<Arc<Entry>> = list.as_ref().clone();
            next.remove(pos);
            std::mem::replace(&mut *list, Arc::new(next))
        };
        drop(old);
        true
    }

    /// Removes every subscriber (handlers are dropped after the lock is
    /// released, as in [`Subscribers::remove`]).
    pub(crate) fn clear(&self) {
        let old = {
            let mut list = self.list.write();
            for e in list.iter() {
                e.active.store(false, Ordering::Release);
            }
            std::mem::replace(&mut *list, Arc::new(Vec::new()))
        };
        drop(old);
    }

    /// How many subscribers there are.
    pub(crate) fn len(&self) -> usize {
        self.list.read().len()
    }

    /// The subscriber list as it is now, for [`dispatch_to`]. A bus that
    /// caches it must drop its copy whenever it adds or removes a
    /// subscriber, or removed handlers stay alive (though never called).
    pub(crate) fn snapshot(&self) -> Snapshot {
        Arc::clone(&self.list.read())
    }
}

/// The subscriber list at one moment, shared with the dispatches using it.
pub(crate) type Snapshot = Arc<Vec<Arc<Entry>>>;

/// Calls every matching handler of `snapshot` that is still subscribed, in
/// subscription order; failures are appended to `failures`.
#[inline]
pub(crate) fn dispatch_to(
    snapshot: &[Arc<Entry>],
    event: &Event,
    failures: &mut Vec<HandlerFailure>,
) {
    for entry in snapshot {
        if entry.filter.matches(event)
            && entry.active.load(Ordering::Acquire)
            && let Err(f) = call(entry.id, entry.handler.as_ref(), event)
        {
            failures.push(f);
        }
    }
}

impl Detach for Subscribers {
    fn detach(&self, id: SubscriptionId) -> bool {
        self.remove(id)
    }
}

/// Runs one handler, turning an error or a panic into a [`HandlerFailure`].
#[inline]
pub(crate) fn call(
    id: SubscriptionId,
    handler: &dyn Handler,
    event: &Event,
) -> Result<(), HandlerFailure> {
    call_for_retry(id, handler, event).map_err(|(f, _)| f)
}

/// As [`call`], with the delay before a redelivery the handler asked for
/// ([`HandlerError::retry_after`](crate::HandlerError::retry_after)).
/// Inlined, so that `call` in the fan-out loop stays one `catch_unwind`
/// around the handler: out of line, its larger result cost 3.5 ns per
/// handler (10 no-op handlers: 97 -> 132 ns, BENCHMARKS.md).
#[inline]
pub(crate) fn call_for_retry(
    id: SubscriptionId,
    handler: &dyn Handler,
    event: &Event,
) -> Result<(), (HandlerFailure, Option<std::time::Duration>)> {
    match catch_unwind(AssertUnwindSafe(|| handler.handle(event))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err((
            HandlerFailure {
                subscription: id,
                error: e.to_string(),
                panicked: false,
            },
            e.retry_delay(),
        )),
        Err(panic) => Err((
            HandlerFailure {
                subscription: id,
                error: format!("handler panicked: {}", panic_message(&*panic)),
                panicked: true,
            },
            None,
        )),
    }
}

/// The message of a panic payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_owned()
    }
}
