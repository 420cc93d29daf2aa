//! The [`Bus`] trait, handlers and subscriptions: what code written against
//! ctrlbus sees, whichever backend runs underneath.

use std::fmt;
use std::sync::Weak;

use crate::error::{HandlerError, PublishError, ReadError, SubscribeError};
use crate::event::Event;
use crate::filter::Filter;
use crate::id::EventId;

/// Something that processes events.
///
/// Any `Fn(&Event) -> Result<(), HandlerError> + Send + Sync` is a handler.
/// A handler may publish, subscribe or unsubscribe on the bus that calls it;
/// the bus holds no lock while it runs. A panic counts as an error.
pub trait Handler: Send + Sync {
    /// Processes one event.
    ///
    /// # Errors
    /// Any [`HandlerError`]: the bus reports it to the publisher (in-memory)
    /// or retries the event (durable subscriptions).
    fn handle(&self, event: &Event) -> Result<(), HandlerError>;
}

impl<F> Handler for F
where
    F: Fn(&Event) -> Result<(), HandlerError> + Send + Sync,
{
    fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        self(event)
    }
}

/// What `publish` returns once the event is published (on the durable bus:
/// durable on disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The event's sequence number: from 1, in commit order, no gaps.
    pub seq: u64,
    /// The event's id.
    pub id: EventId,
    /// True when the id was already in the log: the original receipt is
    /// returned and nothing was written or delivered again.
    pub duplicate: bool,
    /// Handlers that failed or panicked on this event. The event still
    /// counts as published; durable subscribers retry on their own.
    pub handler_failures: Vec<HandlerFailure>,
}

/// One handler's failure on one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerFailure {
    /// The subscription whose handler failed.
    pub subscription: SubscriptionId,
    /// The handler's error, or the panic message.
    pub error: String,
    /// True if the handler panicked.
    pub panicked: bool,
}

/// Identifies one subscription within one bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(pub u64);

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sub-{}", self.0)
    }
}

/// Something a [`Subscription`] can detach itself from.
pub(crate) trait Detach: Send + Sync {
    /// Removes the subscription; true if it was there.
    fn detach(&self, id: SubscriptionId) -> bool;
}

/// A live subscription. It ends on [`Subscription::unsubscribe`] or when
/// dropped; once either returns, its handler is not called again for events
/// published afterwards.
#[must_use = "a subscription ends when dropped"]
pub struct Subscription {
    id: SubscriptionId,
    owner: Weak<dyn Detach>,
}

impl Subscription {
    pub(crate) fn new(id: SubscriptionId, owner: Weak<dyn Detach>) -> Subscription {
        Subscription { id, owner }
    }

    /// This subscription's id, as named in [`HandlerFailure`].
    pub fn id(&self) -> SubscriptionId {
        self.id
    }

    /// Ends the subscription. Returns false if it had already ended (the bus
    /// was closed).
    pub fn unsubscribe(mut self) -> bool {
        self.end()
    }

    fn end(&mut self) -> bool {
        let owner = std::mem::replace(&mut self.owner, Weak::<Nothing>::new());
        owner.upgrade().is_some_and(|o| o.detach(self.id))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.end();
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish()
    }
}

/// A `Detach` that owns nothing: the target of an ended subscription.
struct Nothing;
impl Detach for Nothing {
    fn detach(&self, _: SubscriptionId) -> bool {
        false
    }
}

/// An event bus: publish events, subscribe handlers.
///
/// [`InMemoryBus`](crate::InMemoryBus) and [`DurableBus`](crate::DurableBus)
/// implement it, so code written against `Bus` (or `dyn Bus`) runs on either.
pub trait Bus: Send + Sync {
    /// Publishes one event and runs every matching subscriber's handler
    /// before returning (for the durable bus: after the event is durable).
    ///
    /// # Errors
    /// [`PublishError`]; on error the event was not published.
    fn publish(&self, event: Event) -> Result<Receipt, PublishError>;

    /// Subscribes a boxed handler (the object-safe form of
    /// [`Bus::subscribe`]).
    ///
    /// # Errors
    /// [`SubscribeError::Closed`] after `close`.
    fn subscribe_boxed(
        &self,
        filter: Filter,
        handler: Box<dyn Handler>,
    ) -> Result<Subscription, SubscribeError>;

    /// Subscribes `handler` to events matching `filter`, from now on.
    ///
    /// # Errors
    /// [`SubscribeError::Closed`] after `close`.
    fn subscribe<H: Handler + 'static>(
        &self,
        filter: Filter,
        handler: H,
    ) -> Result<Subscription, SubscribeError>
    where
        Self: Sized,
    {
        self.subscribe_boxed(filter, Box::new(handler))
    }

    /// Up to `limit` of the most recent events matching `filter`, oldest
    /// first.
    ///
    /// # Errors
    /// [`ReadError`] if the bus is closed or storage fails.
    fn recent_events(&self, limit: usize, filter: &Filter) -> Result<Vec<Event>, ReadError>;

    /// Closes the bus: later publishes and subscribes fail, subscriptions end.
    /// Closing twice is harmless.
    fn close(&self);
}
