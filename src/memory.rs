//! [`InMemoryBus`]: synchronous fan-out without persistence.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::bus::{Bus, Detach, Handler, Receipt, Subscription};
use crate::error::{PublishError, ReadError, SubscribeError};
use crate::event::{DEFAULT_MAX_PAYLOAD_BYTES, Event};
use crate::fanout::Subscribers;
use crate::filter::Filter;
use crate::sync::Mutex;

/// Default number of events [`InMemoryBus`] keeps for `recent_events`.
pub const DEFAULT_HISTORY: usize = 1000;

/// An event bus in memory, for single-process use and tests.
///
/// `publish` calls every matching handler synchronously, in subscription
/// order, on the publishing thread. A failing or panicking handler does not
/// stop the others; the publisher learns of it in
/// [`Receipt::handler_failures`]. Publishing from many threads at once is
/// safe: each handler sees each event exactly once, but handlers of events
/// published concurrently may run concurrently and in either order.
///
/// Cloning gives another handle to the same bus.
#[derive(Clone)]
pub struct InMemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    subscribers: Arc<Subscribers>,
    /// The last `capacity` events; invariant: `len() <= capacity`.
    history: Mutex<VecDeque<Event>>,
    capacity: usize,
    max_payload_bytes: usize,
    /// The last sequence number handed out.
    seq: AtomicU64,
    closed: AtomicBool,
}

impl Default for InMemoryBus {
    fn default() -> Self {
        InMemoryBus::new()
    }
}

impl InMemoryBus {
    /// A bus keeping the last [`DEFAULT_HISTORY`] events.
    pub fn new() -> InMemoryBus {
        InMemoryBus::with_history(DEFAULT_HISTORY)
    }

    /// A bus keeping the last `capacity` events for `recent_events`.
    pub fn with_history(capacity: usize) -> InMemoryBus {
        InMemoryBus {
            inner: Arc::new(Inner {
                subscribers: Arc::new(Subscribers::new()),
                history: Mutex::new(VecDeque::with_capacity(capacity)),
                capacity,
                max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
                seq: AtomicU64::new(0),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Number of live subscriptions.
    pub fn subscriber_count(&self) -> usize {
        self.inner.subscribers.len()
    }
}

impl Bus for InMemoryBus {
    fn publish(&self, event: Event) -> Result<Receipt, PublishError> {
        let inner = &*self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        event.check_payload_size(inner.max_payload_bytes)?;
        let seq = inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let mut handler_failures = Vec::new();
        inner.subscribers.dispatch(&event, &mut handler_failures);
        let id = event.id;
        if inner.capacity > 0 {
            let mut history = inner.history.lock();
            if history.len() == inner.capacity {
                history.pop_front();
            }
            history.push_back(event);
        }
        Ok(Receipt {
            seq,
            id,
            duplicate: false,
            handler_failures,
        })
    }

    fn subscribe_boxed(
        &self,
        filter: Filter,
        handler: Box<dyn Handler>,
    ) -> Result<Subscription, SubscribeError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(SubscribeError::Closed);
        }
        let id = self.inner.subscribers.add(filter, handler);
        let owner: Arc<dyn Detach> = self.inner.subscribers.clone();
        Ok(Subscription::new(id, Arc::downgrade(&owner)))
    }

    fn recent_events(&self, limit: usize, filter: &Filter) -> Result<Vec<Event>, ReadError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(ReadError::Closed);
        }
        let history = self.inner.history.lock();
        let mut out: Vec<Event> = history
            .iter()
            .rev()
            .filter(|e| filter.matches(e))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        Ok(out)
    }

    fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.subscribers.clear();
    }
}
