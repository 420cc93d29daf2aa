//! Where the crate wires webhooks to the log's types: `DurableBus::webhooks`
//! and `ReadOnlyLog`'s webhook listings. The log (`durable`) knows nothing
//! of webhooks, and the webhook module adds no methods to the log's types;
//! these few are written here, at the crate's top, as `append_hooks` in
//! `lib.rs` wires the dispatcher in.

use crate::durable::{DurableBus, ReadOnlyLog};
use crate::error::{StorageError, WebhookError};
use crate::id::{DeliveryId, WebhookId};
use crate::webhook::store::read_only;
use crate::webhook::{DeliveryAttempt, DeliveryQuery, Webhook, WebhookDelivery, Webhooks};

impl DurableBus {
    /// The webhook registry of this bus. Private targets (loopback, private
    /// networks, …) are refused unless
    /// [`Webhooks::allow_private_targets`] is set.
    pub fn webhooks(&self) -> Webhooks {
        Webhooks::of(self)
    }
}

impl ReadOnlyLog {
    /// Every webhook, or those of one tenant, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails or a record is corrupted.
    pub fn webhooks(&self, tenant: Option<&str>) -> Result<Vec<Webhook>, StorageError> {
        read_only::webhooks(self, tenant)
    }

    /// One webhook.
    ///
    /// # Errors
    /// [`WebhookError::UnknownWebhook`], [`WebhookError::Storage`].
    pub fn webhook(&self, id: WebhookId) -> Result<Webhook, WebhookError> {
        read_only::webhook(self, id)
    }

    /// Deliveries, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails or a record is corrupted.
    pub fn webhook_deliveries(
        &self,
        q: &DeliveryQuery,
    ) -> Result<Vec<WebhookDelivery>, StorageError> {
        read_only::deliveries(self, q)
    }

    /// One delivery.
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::Storage`].
    pub fn webhook_delivery(&self, id: DeliveryId) -> Result<WebhookDelivery, WebhookError> {
        read_only::delivery(self, id)
    }

    /// The attempt log of one delivery, first attempt first.
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::Storage`].
    pub fn webhook_attempts(&self, id: DeliveryId) -> Result<Vec<DeliveryAttempt>, WebhookError> {
        read_only::attempts(self, id)
    }
}
