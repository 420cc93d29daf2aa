//! Webhooks: a registry in the log's file, delivery records created in the
//! events' own transactions, and delivery workers that sign per [Standard
//! Webhooks], retry on a schedule and record every attempt (G8, G9).
//!
//! - `store`: `schema` (the tables and stored records, and what `check`
//!   says of them), `types` (the public records [`Webhook`],
//!   [`WebhookDelivery`], [`DeliveryAttempt`]), `queries` (read-only
//!   listings), `deliveries` (the one function that moves a delivery
//!   between states) and `registry` (the handle [`Webhooks`]);
//! - `dispatch`: the log's append hook that creates deliveries in the
//!   events' own transaction (G8, G9), handed to each bus when it is built;
//! - `worker`: [`DeliveryWorker`]; `worker::scheduler` claims due
//!   deliveries fairly per webhook (G12) and records outcomes,
//!   `worker::http` makes one signed attempt (no environment proxy, the
//!   address policy on the addresses connected to);
//! - `signing`, `url_policy`: signatures and which targets are allowed.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com

pub(crate) mod contract;
pub(crate) mod dispatch;
pub(crate) mod signing;
pub(crate) mod store;
pub(crate) mod url_policy;
pub(crate) mod worker;

pub use contract::{Deliverer, WebhookRegistry};
pub use signing::{
    DEFAULT_TOLERANCE, GENERATED_SECRET_LEN, HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP,
    Headers, MAX_SECRET_LEN, MIN_SECRET_LEN, SECRET_PREFIX, Secret, sign, signature_header, verify,
    verify_at,
};
pub use store::{
    CreatedWebhook, DEFAULT_ROTATION_GRACE, DeliveryAttempt, DeliveryQuery, DeliveryStatus,
    NewWebhook, Webhook, WebhookDelivery, WebhookUpdate, Webhooks,
};
pub use url_policy::MAX_URL_LEN;
pub use worker::{
    DEFAULT_RETRY_SCHEDULE, DeliveryOptions, DeliveryWorker, RESPONSE_LOG_BYTES, USER_AGENT,
};

use crate::error::StorageError;

/// Creates the webhook tables in a new or upgraded log.
pub(crate) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), StorageError> {
    txn.open_table(store::WEBHOOKS)?;
    txn.open_table(store::HOOK_META)?;
    txn.open_table(store::DELIVERIES)?;
    txn.open_table(store::DUE)?;
    txn.open_table(store::BY_HOOK)?;
    txn.open_table(store::ATTEMPTS)?;
    Ok(())
}

/// The webhook dispatcher as an append hook, for each new bus.
pub(crate) fn append_hook() -> std::sync::Arc<dyn crate::durable::AppendHook> {
    dispatch::hook()
}
