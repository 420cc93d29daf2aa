//! The async API for tokio control planes (feature `tokio`).
//!
//! - [`DurableBus::publish_async`](crate::DurableBus::publish_async)
//!   returns a [`PublishFuture`], completed by the commit path through the
//!   task's waker: no thread and no `spawn_blocking` per call.
//! - [`DurableBus::stream`](crate::DurableBus::stream) is an
//!   [`EventStream`] of live events: bounded, it never blocks a publisher,
//!   and a consumer that falls behind gets a [`Lagged`] item with the number
//!   of events it missed, never a silent gap (as tokio's `broadcast`).
//! - [`DurableBus::durable_stream`](crate::DurableBus::durable_stream) is a
//!   [`DurableStream`] over a named durable cursor: [`Delivery`] items to
//!   [`ack`](Delivery::ack) or [`nack`](Delivery::nack).
//!
//! Nothing here needs a particular runtime's timers or reactor: the
//! futures and streams work on any executor (tokio's `sync` types only).

mod durable;
mod live;
mod publish;

pub use durable::{AckError, AckFuture, Delivery, DurableStream};
pub use live::{DEFAULT_STREAM_CAPACITY, EventStream, Lagged};
pub use publish::PublishFuture;

/// What a JetStream subscription implements to back a `DurableStream`.
#[cfg(feature = "jetstream")]
pub(crate) use durable::Running;
pub(crate) use durable::open as open_durable;
pub(crate) use live::open as open_live;
