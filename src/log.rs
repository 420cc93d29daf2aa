//! [`EventLog`]: the durable log's contract as a trait, so that code written
//! against it runs unchanged on [`DurableBus`](crate::DurableBus) (a redb
//! file) and on `JetStreamBus` (a NATS JetStream cluster, feature
//! `jetstream`).
//!
//! It extends [`Bus`] (publish, live subscribe, recent events, close) with
//! what a log adds: batches, reading from any position, the newest `seq`,
//! and named durable subscriptions with their positions and dead letters.
//! `tests/contract.rs` runs one suite of checks against both backends.
//! The webhook registry and the delivery worker are in it too, through
//! [`WebhookRegistry`] and [`Deliverer`].

use crate::bus::{Bus, Handler, Receipt};
use crate::durable::{CursorInfo, DeadLetter, LogEntry, Position};
use crate::error::{
    CursorError, DeliveryError, PublishError, ReadError, StorageError, SubscribeError,
};
use crate::event::Event;
use crate::filter::Filter;
use crate::webhook::{Deliverer, DeliveryOptions, WebhookRegistry};

/// A durable, ordered event log with a bus on top (G1–G7, G9–G11).
pub trait EventLog: Bus {
    /// The reader [`EventLog::read`] returns.
    type Reader: Iterator<Item = Result<LogEntry, ReadError>>;

    /// Publishes several events with consecutive `seq`s; an event whose id
    /// is already in the log gets its original receipt. On `DurableBus`
    /// the batch is atomic; on `JetStreamBus` it is published in order and
    /// an error leaves the events before the failing one published.
    ///
    /// # Errors
    /// As [`Bus::publish`]; [`PublishError::DuplicateInBatch`].
    fn publish_batch(&self, events: Vec<Event>) -> Result<Vec<Receipt>, PublishError>;

    /// The log from `from` as it is now, the events matching `filter`, in
    /// `seq` order, streamed.
    ///
    /// # Errors
    /// [`ReadError`] when the storage fails, the bus is closed, or (on
    /// `DurableBus`) a [`Position::Id`] is not in the log.
    fn read(&self, from: Position, filter: &Filter) -> Result<Self::Reader, ReadError>;

    /// The `seq` of the newest event (0 for an empty log).
    ///
    /// # Errors
    /// [`StorageError`] when the storage (or the cluster) does not answer.
    fn last_seq(&self) -> Result<u64, StorageError>;

    /// A running durable subscription; dropping it stops it (its position
    /// is kept).
    type DurableSubscription: Send;

    /// Subscribes `handler` under the durable name `name` (G5): from its
    /// stored position if it exists, else from `start`; in `seq` order, at
    /// least once; a failing event is retried and dead-lettered after
    /// `max_deliveries`.
    ///
    /// # Errors
    /// [`SubscribeError`]: a bad name, a name already running (on
    /// `DurableBus`), an unknown start, a closed bus, a storage failure.
    fn subscribe_durable_boxed(
        &self,
        name: &str,
        filter: Filter,
        start: Position,
        handler: Box<dyn Handler>,
    ) -> Result<Self::DurableSubscription, SubscribeError>;

    /// Every event up to this `seq` has been handled by the durable
    /// subscription `name` (acknowledged or dead-lettered).
    ///
    /// # Errors
    /// [`CursorError::Unknown`] for a name never subscribed;
    /// [`CursorError::InvalidName`]; [`CursorError::Storage`].
    fn cursor_position(&self, name: &str) -> Result<u64, CursorError>;

    /// The dead letters of the durable subscription `name`, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when the storage fails.
    fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>, StorageError>;

    /// Deletes the durable subscription `name` (its position and its dead
    /// letters).
    ///
    /// # Errors
    /// [`CursorError::Unknown`], [`CursorError::Active`] (on `DurableBus`,
    /// while it runs), [`CursorError::Storage`].
    fn delete_cursor(&self, name: &str) -> Result<(), CursorError>;

    /// Every durable subscription, by name.
    ///
    /// # Errors
    /// [`StorageError`] when the storage (or the cluster) fails.
    fn cursors(&self) -> Result<Vec<CursorInfo>, StorageError>;

    /// One durable subscription.
    ///
    /// # Errors
    /// [`CursorError::Unknown`], [`CursorError::InvalidName`],
    /// [`CursorError::Storage`].
    fn cursor(&self, name: &str) -> Result<CursorInfo, CursorError>;

    /// Moves the durable subscription `name`: it next receives the event
    /// at `position`.
    ///
    /// # Errors
    /// [`CursorError::Unknown`]; [`CursorError::Active`] while it runs (on
    /// `JetStreamBus`, in any process); [`CursorError::UnknownEvent`];
    /// [`CursorError::Storage`]. Nothing is changed on error.
    fn seek(&self, name: &str, position: Position) -> Result<CursorInfo, CursorError>;

    /// The webhook registry [`EventLog::webhook_registry`] gives.
    type Webhooks: WebhookRegistry;

    /// The log's webhook registry.
    fn webhook_registry(&self) -> Self::Webhooks;

    /// The delivery worker [`EventLog::start_delivery`] starts.
    type DeliveryWorker: Deliverer;

    /// Starts delivering the log's webhook deliveries.
    ///
    /// # Errors
    /// [`DeliveryError::InvalidOptions`], [`DeliveryError::Closed`],
    /// [`DeliveryError::AlreadyRunning`] (on `DurableBus`, one per bus),
    /// [`DeliveryError::Storage`], [`DeliveryError::Io`].
    fn start_delivery(&self, opts: DeliveryOptions) -> Result<Self::DeliveryWorker, DeliveryError>;
}

/// A boxed handler as a handler.
struct Boxed(Box<dyn Handler>);

impl Handler for Boxed {
    fn handle(&self, event: &Event) -> Result<(), crate::HandlerError> {
        self.0.handle(event)
    }
}

impl EventLog for crate::DurableBus {
    type Reader = crate::LogReader;

    fn publish_batch(&self, events: Vec<Event>) -> Result<Vec<Receipt>, PublishError> {
        crate::DurableBus::publish_batch(self, events)
    }

    fn read(&self, from: Position, filter: &Filter) -> Result<Self::Reader, ReadError> {
        crate::DurableBus::read(self, from, filter)
    }

    fn last_seq(&self) -> Result<u64, StorageError> {
        Ok(crate::DurableBus::last_seq(self))
    }

    type DurableSubscription = crate::DurableSubscription;

    fn subscribe_durable_boxed(
        &self,
        name: &str,
        filter: Filter,
        start: Position,
        handler: Box<dyn Handler>,
    ) -> Result<Self::DurableSubscription, SubscribeError> {
        crate::DurableBus::subscribe_durable(self, name, filter, start, Boxed(handler))
    }

    fn cursor_position(&self, name: &str) -> Result<u64, CursorError> {
        Ok(crate::DurableBus::cursor(self, name)?.delivered_seq)
    }

    fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>, StorageError> {
        crate::DurableBus::dead_letters(self, name)
    }

    fn delete_cursor(&self, name: &str) -> Result<(), CursorError> {
        crate::DurableBus::delete_cursor(self, name)
    }

    fn cursors(&self) -> Result<Vec<CursorInfo>, StorageError> {
        crate::DurableBus::cursors(self)
    }

    fn cursor(&self, name: &str) -> Result<CursorInfo, CursorError> {
        crate::DurableBus::cursor(self, name)
    }

    fn seek(&self, name: &str, position: Position) -> Result<CursorInfo, CursorError> {
        crate::DurableBus::seek(self, name, position)
    }

    type Webhooks = crate::Webhooks;

    fn webhook_registry(&self) -> Self::Webhooks {
        crate::DurableBus::webhooks(self)
    }

    type DeliveryWorker = crate::DeliveryWorker;

    fn start_delivery(&self, opts: DeliveryOptions) -> Result<Self::DeliveryWorker, DeliveryError> {
        crate::DeliveryWorker::start(self.clone(), opts)
    }
}

#[cfg(feature = "jetstream")]
impl EventLog for crate::JetStreamBus {
    type Reader = crate::JetStreamReader;

    fn publish_batch(&self, events: Vec<Event>) -> Result<Vec<Receipt>, PublishError> {
        crate::JetStreamBus::publish_batch(self, events)
    }

    fn read(&self, from: Position, filter: &Filter) -> Result<Self::Reader, ReadError> {
        crate::JetStreamBus::read(self, from, filter)
    }

    fn last_seq(&self) -> Result<u64, StorageError> {
        crate::JetStreamBus::last_seq(self)
    }

    type DurableSubscription = crate::JetStreamSubscription;

    fn subscribe_durable_boxed(
        &self,
        name: &str,
        filter: Filter,
        start: Position,
        handler: Box<dyn Handler>,
    ) -> Result<Self::DurableSubscription, SubscribeError> {
        crate::JetStreamBus::subscribe_durable(self, name, filter, start, Boxed(handler))
    }

    fn cursor_position(&self, name: &str) -> Result<u64, CursorError> {
        crate::JetStreamBus::cursor_position(self, name)
    }

    fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>, StorageError> {
        crate::JetStreamBus::dead_letters(self, name)
    }

    fn delete_cursor(&self, name: &str) -> Result<(), CursorError> {
        crate::JetStreamBus::delete_cursor(self, name)
    }

    fn cursors(&self) -> Result<Vec<CursorInfo>, StorageError> {
        crate::JetStreamBus::cursors(self)
    }

    fn cursor(&self, name: &str) -> Result<CursorInfo, CursorError> {
        crate::JetStreamBus::cursor(self, name)
    }

    fn seek(&self, name: &str, position: Position) -> Result<CursorInfo, CursorError> {
        crate::JetStreamBus::seek(self, name, position)
    }

    type Webhooks = crate::JetStreamWebhooks;

    fn webhook_registry(&self) -> Self::Webhooks {
        crate::JetStreamBus::webhooks(self)
    }

    type DeliveryWorker = crate::JetStreamDeliveryWorker;

    fn start_delivery(&self, opts: DeliveryOptions) -> Result<Self::DeliveryWorker, DeliveryError> {
        crate::JetStreamDeliveryWorker::start(self.clone(), opts)
    }
}
