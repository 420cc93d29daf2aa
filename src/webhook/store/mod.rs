//! The webhook registry and the delivery records, in the log's redb file.
//!
//! Tables (all keys big-endian, so they sort):
//! - `webhooks`: webhook id (16 bytes) → [`HookRec`] (bincode);
//! - `webhook_meta`: `"version"` → u64, bumped by every change to a
//!   webhook's tenant, URL, patterns or `active` flag, in the same
//!   transaction. The dispatcher compares it inside each append transaction
//!   to know whether its cache of active webhooks is current (see
//!   `dispatch`).
//! - `webhook_deliveries`: delivery id → [`DeliRec`];
//! - `webhook_due`: (due time ns, delivery id) → (): exactly one entry per
//!   pending delivery, at its `next_retry_ns`; none for a finished one;
//! - `webhook_deliveries_by_hook`: (webhook id, delivery id) → (), one entry
//!   per delivery;
//! - `webhook_attempts`: (delivery id, attempt number from 1) → [`AttemptRec`].
//!
//! Invariant: a delivery is `pending` if and only if it has a due entry, at
//! its `next_retry_ns`; every write below keeps the two together in one
//! transaction.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use jiff::Timestamp;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::signing::Secret;
use super::url_policy::{UrlPolicy, validate_url};
use crate::durable::{DurableBus, Position, ReadOnlyLog, Shared, decode_record, encode_record};
use crate::error::{StorageError, WebhookError};
use crate::filter::{Filter, Pattern};
use crate::id::{DeliveryId, EventId, WebhookId};

mod deliveries;
mod queries;
mod registry;
mod schema;
mod types;

pub(crate) use deliveries::*;
pub(crate) use queries::*;
pub(crate) use registry::*;
pub use registry::{DEFAULT_ROTATION_GRACE, Webhooks};
pub(crate) use schema::*;
pub(crate) use types::*;
pub use types::{
    CreatedWebhook, DeliveryAttempt, DeliveryQuery, DeliveryStatus, NewWebhook, Webhook,
    WebhookDelivery, WebhookUpdate,
};
