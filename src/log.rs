//! [`EventLog`]: the durable log's contract as a trait, so that code written
//! against it runs unchanged on [`DurableBus`](crate::DurableBus) (a redb
//! file) and on `JetStreamBus` (a NATS JetStream cluster, feature
//! `jetstream`).
//!
//! It extends [`Bus`] (publish, live subscribe, recent events, close) with
//! what a log adds: batches, reading from any position, and the newest
//! `seq`. `tests/contract.rs` runs one suite of checks against both
//! backends. Durable subscriptions, cursors and webhooks are still
//! `DurableBus`'s own: `JetStreamBus` does not have them yet.

use crate::bus::{Bus, Receipt};
use crate::durable::{LogEntry, Position};
use crate::error::{PublishError, ReadError, StorageError};
use crate::event::Event;
use crate::filter::Filter;

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
}
