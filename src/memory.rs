//! [`InMemoryBus`]: synchronous fan-out without persistence.
//!
//! Invariants:
//! - `publish` records the event (sequence number and history ring, under the
//!   one `state` lock) *before* any handler sees it, as the durable bus
//!   commits before it fans out: history order is `seq` order, and a handler
//!   reading the history finds the event it is handling.
//! - `State::subscribers` caches the subscriber list. Every add, remove and
//!   clear empties it after changing the list and before returning, so a
//!   publish that starts after `subscribe`/`unsubscribe`/`close` returns sees
//!   the change, and the cache never keeps a removed handler alive.
//! - Lock order: `state`, then the subscriber list's lock (only to refresh
//!   the cache). No lock is held while a handler runs, and nothing that may
//!   drop a handler (whose captures may unsubscribe) is dropped under a lock.
//!
//! Cost: one lock round trip per publish; the subscriber list and the event
//! are shared by reference count, not copied, and in the steady state (a full
//! ring) the evicted event's allocation is reused.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value};

use crate::bus::{Bus, Detach, Handler, Receipt, Subscription, SubscriptionId};
use crate::error::{PublishError, ReadError, SubscribeError};
use crate::event::{DEFAULT_MAX_PAYLOAD_BYTES, Event};
use crate::fanout::{Snapshot, Subscribers, dispatch_to};
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
/// An event is in the history (and has its sequence number) before its
/// handlers run, so [`Bus::recent_events`] lists events in `seq` order, and
/// an event published by a handler comes after the event that caused it.
///
/// Cloning gives another handle to the same bus.
#[derive(Clone)]
pub struct InMemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    subscribers: Subscribers,
    state: Mutex<State>,
    /// Invariant: `state.ring.len() <= capacity`.
    capacity: usize,
    max_payload_bytes: usize,
    closed: AtomicBool,
}

/// What `publish` changes, under one lock.
struct State {
    /// The last sequence number handed out.
    seq: u64,
    /// The last `capacity` events, oldest first, in `seq` order.
    ring: VecDeque<Arc<Event>>,
    /// The current subscriber list, or `None` when it must be re-read.
    subscribers: Option<Snapshot>,
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
                subscribers: Subscribers::new(),
                state: Mutex::new(State {
                    seq: 0,
                    ring: VecDeque::with_capacity(capacity),
                    subscribers: None,
                }),
                capacity,
                max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Number of live subscriptions.
    pub fn subscriber_count(&self) -> usize {
        self.inner.subscribers.len()
    }
}

impl Inner {
    /// Drops the cached subscriber list after a change to it.
    fn invalidate(&self) {
        let stale = self.state.lock().subscribers.take();
        drop(stale); // outside the lock: it may hold the last handler
    }
}

impl Detach for Inner {
    fn detach(&self, id: SubscriptionId) -> bool {
        let removed = self.subscribers.remove(id);
        if removed {
            self.invalidate();
        }
        removed
    }
}

impl Bus for InMemoryBus {
    fn publish(&self, event: Event) -> Result<Receipt, PublishError> {
        let inner = &*self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        event.validate(inner.max_payload_bytes)?;
        let id = event.id;
        let (seq, event, subscribers, evicted) = {
            let mut state = inner.state.lock();
            state.seq += 1;
            let seq = state.seq;
            let (event, evicted) = if inner.capacity == 0 {
                (Arc::new(event), Evicted::Nothing)
            } else {
                let oldest = if state.ring.len() == inner.capacity {
                    state.ring.pop_front()
                } else {
                    None
                };
                let (event, evicted) = recycle(oldest, event);
                state.ring.push_back(Arc::clone(&event));
                (event, evicted)
            };
            let subscribers = if let Some(list) = &state.subscribers {
                Arc::clone(list)
            } else {
                let list = inner.subscribers.snapshot();
                state.subscribers = Some(Arc::clone(&list));
                list
            };
            (seq, event, subscribers, evicted)
        };
        drop(evicted); // outside the lock
        let mut handler_failures = Vec::new();
        dispatch_to(&subscribers, &event, &mut handler_failures);
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
        self.inner.invalidate();
        let owner: Arc<dyn Detach> = self.inner.clone();
        Ok(Subscription::new(id, Arc::downgrade(&owner)))
    }

    fn recent_events(&self, limit: usize, filter: &Filter) -> Result<Vec<Event>, ReadError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(ReadError::Closed);
        }
        // Take references under the lock; copy the events after releasing it.
        let mut picked: Vec<Arc<Event>> = {
            let state = self.inner.state.lock();
            state
                .ring
                .iter()
                .rev()
                .filter(|e| filter.matches(e))
                .take(limit)
                .cloned()
                .collect()
        };
        picked.reverse();
        Ok(picked.iter().map(|e| Event::clone(e)).collect())
    }

    fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.subscribers.clear();
        self.inner.invalidate();
    }
}

/// What leaves the history on a publish; dropped after the lock is released.
enum Evicted {
    Nothing,
    /// The evicted event's payload (the event's allocation was reused).
    Payload(#[allow(dead_code)] Map<String, Value>),
    /// The evicted event, still shared with a reader or a dispatch.
    Shared(#[allow(dead_code)] Arc<Event>),
}

/// Puts `event` in an `Arc` for the history, reusing the allocation of the
/// evicted `oldest` when nothing else holds it (the steady state of a full
/// ring), which saves an allocation, a free and a copy per publish.
fn recycle(oldest: Option<Arc<Event>>, event: Event) -> (Arc<Event>, Evicted) {
    match oldest {
        Some(mut arc) => match Arc::get_mut(&mut arc) {
            Some(slot) => {
                // Overwrite in place: no second copy of the (large) event.
                // The old payload, which may be big, is freed after the lock
                // is released; its strings are freed here.
                let payload = std::mem::take(&mut slot.payload);
                *slot = event;
                (arc, Evicted::Payload(payload))
            }
            None => (Arc::new(event), Evicted::Shared(arc)),
        },
        None => (Arc::new(event), Evicted::Nothing),
    }
}
