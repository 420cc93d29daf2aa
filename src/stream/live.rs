//! [`EventStream`]: live events as a `Stream`, bounded, with [`Lagged`]
//! instead of a silent gap.
//!
//! The subscription's handler, run inside `publish`, only pushes a clone of
//! the event into a ring of `capacity` events and wakes the consumer's
//! task: it never waits, so a consumer that doesn't poll never holds up a
//! publisher (G6). A full ring drops its oldest event and counts it; the
//! consumer's next item is then `Err(Lagged { missed })`, followed by the
//! events the ring kept, so the gap is always reported where it is (as
//! tokio's `broadcast` does). A hand-written ring rather than
//! `tokio::sync::broadcast`: each stream has its own filter, so it would
//! be one broadcast channel per stream anyway, and its receiver is not a
//! `Stream` without another crate and a boxed future per item.
//!
//! Invariant: `missed` counts events dropped since the consumer last took
//! an item; they come, in the log, before every event in the ring.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_core::Stream;

use crate::bus::{Bus, Subscription};
use crate::error::{HandlerError, SubscribeError};
use crate::event::Event;
use crate::filter::Filter;
use crate::sync::Mutex;

/// Events an [`EventStream`] holds for a consumer that is behind, by
/// default.
pub const DEFAULT_STREAM_CAPACITY: usize = 1024;

/// A live stream item that stands for events the consumer missed: the ring
/// was full, and `missed` events before the next item were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged {
    /// How many matching events were dropped.
    pub missed: u64,
}

impl std::fmt::Display for Lagged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the stream fell behind and missed {} events",
            self.missed
        )
    }
}

impl std::error::Error for Lagged {}

struct Ring {
    state: Mutex<RingState>,
}

struct RingState {
    events: VecDeque<Event>,
    capacity: usize,
    missed: u64,
    waker: Option<Waker>,
    /// The subscription ended (dropped, or the bus closed).
    ended: bool,
}

/// The subscription's handler: pushes into the ring, never waits.
struct Feeder(Arc<Ring>);

impl crate::bus::Handler for Feeder {
    fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let waker = {
            let mut st = self.0.state.lock();
            if st.events.len() >= st.capacity {
                st.events.pop_front();
                st.missed += 1;
            }
            st.events.push_back(event.clone());
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        let waker = {
            let mut st = self.0.state.lock();
            st.ended = true;
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A `Stream` of the live events that match a filter, from its creation
/// on: items are `Ok(event)` in `seq` order, or `Err(Lagged)` where events
/// were dropped because the consumer fell `capacity` events behind. It ends
/// when the bus closes; dropping it ends the subscription.
pub struct EventStream {
    ring: Arc<Ring>,
    _sub: Subscription,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.ring.state.lock();
        f.debug_struct("EventStream")
            .field("buffered", &st.events.len())
            .field("capacity", &st.capacity)
            .finish_non_exhaustive()
    }
}

/// Subscribes a ring of `capacity` (at least 1) events on `bus`.
pub(crate) fn open(
    bus: &dyn Bus,
    filter: Filter,
    capacity: usize,
) -> Result<EventStream, SubscribeError> {
    let capacity = capacity.max(1);
    let ring = Arc::new(Ring {
        state: Mutex::new(RingState {
            events: VecDeque::with_capacity(capacity.min(DEFAULT_STREAM_CAPACITY)),
            capacity,
            missed: 0,
            waker: None,
            ended: false,
        }),
    });
    let sub = bus.subscribe_boxed(filter, Box::new(Feeder(ring.clone())))?;
    Ok(EventStream { ring, _sub: sub })
}

impl Stream for EventStream {
    type Item = Result<Event, Lagged>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut st = self.ring.state.lock();
        if st.missed > 0 {
            let missed = std::mem::take(&mut st.missed);
            return Poll::Ready(Some(Err(Lagged { missed })));
        }
        if let Some(e) = st.events.pop_front() {
            return Poll::Ready(Some(Ok(e)));
        }
        if st.ended {
            return Poll::Ready(None);
        }
        match &st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.ring.state.lock().events.len(), None)
    }
}
