//! ctrlbus: a durable, embedded event log and event bus for control planes.
//!
//! A control plane publishes lifecycle events (`instance.created`,
//! `deploy.failed`, …). ctrlbus appends each one to a log in a redb file,
//! durably, **before** any subscriber sees it, then fans it out
//! synchronously to in-process subscribers. Named durable subscriptions
//! resume after a crash and replay from any point in time; webhooks receive
//! matching events signed per the Standard Webhooks specification.
//!
//! The same [`Bus`] trait runs in memory ([`InMemoryBus`]) and on disk.
//!
//! ```
//! use ctrlbus::{Bus, Event, Filter, HandlerError, InMemoryBus, Type};
//! use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = InMemoryBus::new();
//! let seen = Arc::new(AtomicUsize::new(0));
//! let counter = seen.clone();
//! let _sub = bus.subscribe(Filter::types(["deploy.*"])?, move |e: &Event| -> Result<(), HandlerError> {
//!     assert!(e.event_type.as_str().starts_with("deploy."));
//!     counter.fetch_add(1, Ordering::SeqCst);
//!     Ok(())
//! })?;
//! bus.publish(Event::new(Type::DEPLOY_STARTED, "tenant-1").with_actor("alice"))?;
//! bus.publish(Event::new(Type::HEALTH_PASSED, "tenant-1"))?;
//! assert_eq!(seen.load(Ordering::SeqCst), 1); // fan-out is synchronous
//! # Ok(())
//! # }
//! ```
//!
//! Backends and features:
//! - [`InMemoryBus`] and [`DurableBus`] (a redb file with a write-ahead
//!   log) are always there; [`EventLog`] is the durable log's contract,
//!   implemented by `DurableBus` and, with feature `jetstream`,
//!   `JetStreamBus` (a NATS JetStream cluster, for several replicas).
//! - Feature `tokio`: the async API (`ctrlbus::stream`): `publish_async`, live
//!   `stream`s with `Lagged`, and `durable_stream`s of deliveries to ack.
//! - Feature `metrics`: counters, gauges and histograms through the
//!   `metrics` facade ([`telemetry`] has their names).
//! - Feature `cli` (default): the `ctrlbus` binary.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bus;
mod compact_json;
mod durable;
mod error;
mod event;
mod fanout;
mod files;
mod filter;
#[cfg(feature = "fuzzing")]
mod fuzzing;
mod id;
#[cfg(feature = "jetstream")]
mod jetstream;
mod limits;
mod log;
mod memory;
#[cfg(feature = "tokio")]
pub mod stream;
mod sync;
pub mod telemetry;
#[cfg(test)]
mod test_rng;
mod time;
pub mod webhook;
mod webhook_access;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod __fuzz {
    //! Fuzz entry points (feature `fuzzing`); not part of the API.
    pub use crate::fuzzing::*;
}
/// The append hooks every [`DurableBus`] gets: the webhook dispatcher. The
/// log (`durable`) knows hooks only through its trait; this is where the
/// crate wires its parts together.
pub(crate) fn append_hooks() -> Vec<durable::HookFactory> {
    vec![std::sync::Arc::new(webhook::append_hook)]
}

pub use bus::{Bus, Handler, HandlerFailure, Receipt, Subscription, SubscriptionId};
pub use durable::{
    CheckReport, CursorInfo, CursorState, DeadLetter, DurableBus, DurableBusBuilder,
    DurableSubscription, LogEntry, LogReader, MAX_BATCH_BYTES, PendingPublish, Position,
    ReadOnlyLog, RedriveReport, RetainReport, Retention, Stats,
};
pub use error::{
    CursorError, EventError, FilterError, HandlerError, IdError, OpenError, PublishError,
    ReadError, StorageError, StreamError, SubscribeError, TypeError,
};
pub use error::{DeliveryError, SecretError, UrlError, VerifyError, WebhookError};
pub use event::{
    DEFAULT_MAX_PAYLOAD_BYTES, Event, MAX_TYPE_LEN, Type, format_rfc3339, parse_rfc3339,
};
pub use filter::{Filter, Pattern};
pub use id::{DeliveryId, EventId, InstanceId, WebhookId};
#[cfg(feature = "jetstream")]
pub use jetstream::{
    DEFAULT_DUPLICATE_WINDOW, DEFAULT_PUBLISH_DEADLINE, JetStreamBus, JetStreamBusBuilder,
    JetStreamDeliveryWorker, JetStreamReader, JetStreamSubscription, JetStreamWebhooks,
};
pub use limits::{MAX_ACTOR_LEN, MAX_JSON_DEPTH, MAX_TENANT_LEN};
pub use log::EventLog;
pub use memory::{DEFAULT_HISTORY, InMemoryBus};
pub use time::{TimeError, parse_duration, parse_time, parse_time_at};
pub use webhook::{
    CreatedWebhook, Deliverer, DeliveryAttempt, DeliveryOptions, DeliveryQuery, DeliveryStatus,
    DeliveryWorker, NewWebhook, Secret, Webhook, WebhookDelivery, WebhookRegistry, WebhookUpdate,
    Webhooks,
};
