//! The async API of [`DurableBus`] (feature `tokio`); the types are in
//! [`crate::stream`].

use super::*;
use crate::stream::{self, DurableStream, EventStream, PublishFuture};

impl DurableBus {
    /// Publishes one event; the future resolves to its [`Receipt`] once it
    /// is durable and the caught-up subscribers have run, as
    /// [`Bus::publish`] returns. The commit path completes it through the
    /// task's waker: no thread waits for it, and no fsync or handler runs on
    /// the runtime's thread (the writer thread commits async publishes, in
    /// groups, and the bus's completion thread fans them out).
    ///
    /// The event is checked and queued at this call; dropping the future
    /// doesn't cancel it (see [`PublishFuture`] on cancellation safety).
    ///
    /// # Errors
    /// As [`Bus::publish`]. An error the call can see at once (invalid
    /// event, closed bus) is the future's first result.
    pub fn publish_async(&self, event: Event) -> PublishFuture {
        match commit::submit_async(&self.handle.shared, vec![event]) {
            Ok(rx) => PublishFuture::waiting(rx),
            Err(e) => PublishFuture::refused(e),
        }
    }

    /// A stream of the live events matching `filter`, from now on, holding
    /// up to [`DEFAULT_STREAM_CAPACITY`](stream::DEFAULT_STREAM_CAPACITY)
    /// events for a consumer that is behind (see [`EventStream`]).
    ///
    /// # Errors
    /// [`SubscribeError::Closed`] after `close`.
    pub fn stream(&self, filter: Filter) -> Result<EventStream, SubscribeError> {
        self.stream_with_capacity(filter, stream::DEFAULT_STREAM_CAPACITY)
    }

    /// As [`DurableBus::stream`], holding up to `capacity` events (at
    /// least 1) before the consumer gets a [`Lagged`](stream::Lagged).
    ///
    /// # Errors
    /// [`SubscribeError::Closed`] after `close`.
    pub fn stream_with_capacity(
        &self,
        filter: Filter,
        capacity: usize,
    ) -> Result<EventStream, SubscribeError> {
        stream::open_live(self, filter, capacity)
    }

    /// A stream over the named durable cursor `name`, as
    /// [`DurableBus::subscribe_durable`] with the same rules (G5): from the
    /// stored position if the cursor exists, else from `start`; in `seq`
    /// order; each event delivered until acknowledged, retried, and
    /// dead-lettered after `max_deliveries`. See [`DurableStream`].
    ///
    /// # Errors
    /// As [`DurableBus::subscribe_durable`].
    pub fn durable_stream(
        &self,
        name: &str,
        filter: Filter,
        start: Position,
    ) -> Result<DurableStream, SubscribeError> {
        stream::open_durable(|pull| {
            subscription::subscribe(
                &self.handle.shared,
                name,
                filter,
                start,
                subscription::Consumer::Pull(pull),
            )
        })
    }
}
