//! The webhook contract as traits, implemented by both backends' registries
//! ([`Webhooks`] on a file, `JetStreamWebhooks` on a cluster) and delivery
//! workers ([`DeliveryWorker`], `JetStreamDeliveryWorker`), so that code
//! (the command line, `tests/contract.rs`) runs unchanged on either. Each
//! method is the inherent one of the same name; see those for the details
//! of each backend.

use std::time::Duration;

use jiff::Timestamp;

use super::{
    CreatedWebhook, DeliveryAttempt, DeliveryQuery, DeliveryWorker, NewWebhook, Webhook,
    WebhookDelivery, WebhookUpdate, Webhooks,
};
use crate::error::{StorageError, WebhookError};
use crate::id::{DeliveryId, WebhookId};

/// A webhook registry: webhooks, their deliveries and attempt logs.
pub trait WebhookRegistry: Clone {
    /// Allows loopback, private and link-local targets (default off).
    #[must_use]
    fn allow_private_targets(self, allow: bool) -> Self;

    /// Registers a webhook; the secret is returned only here (and by
    /// [`WebhookRegistry::rotate_secret`]).
    ///
    /// # Errors
    /// [`WebhookError::InvalidTenant`], [`WebhookError::Url`],
    /// [`WebhookError::Secret`], [`WebhookError::Pattern`] (nothing
    /// stored); [`WebhookError::Storage`], [`WebhookError::Closed`].
    fn create(&self, new: NewWebhook) -> Result<CreatedWebhook, WebhookError>;

    /// One webhook.
    ///
    /// # Errors
    /// [`WebhookError::UnknownWebhook`], [`WebhookError::Storage`].
    fn get(&self, id: WebhookId) -> Result<Webhook, WebhookError>;

    /// Every webhook, or one tenant's, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when the storage fails or a record is corrupted.
    fn list(&self, tenant: Option<&str>) -> Result<Vec<Webhook>, StorageError>;

    /// Changes a webhook's URL, patterns or state.
    ///
    /// # Errors
    /// [`WebhookError::UnknownWebhook`], [`WebhookError::Url`],
    /// [`WebhookError::Pattern`], [`WebhookError::Storage`].
    fn update(&self, id: WebhookId, update: WebhookUpdate) -> Result<Webhook, WebhookError>;

    /// Deletes a webhook; its pending deliveries fail.
    ///
    /// # Errors
    /// [`WebhookError::UnknownWebhook`], [`WebhookError::Storage`].
    fn delete(&self, id: WebhookId) -> Result<(), WebhookError>;

    /// Replaces a webhook's secret (the old one signs beside it for the
    /// grace period).
    ///
    /// # Errors
    /// [`WebhookError::Secret`], [`WebhookError::UnknownWebhook`],
    /// [`WebhookError::Storage`].
    fn rotate_secret(
        &self,
        id: WebhookId,
        secret: Option<&str>,
    ) -> Result<CreatedWebhook, WebhookError>;

    /// Deliveries, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when the storage fails or a record is corrupted.
    fn deliveries(&self, q: &DeliveryQuery) -> Result<Vec<WebhookDelivery>, StorageError>;

    /// One delivery.
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::Storage`].
    fn delivery(&self, id: DeliveryId) -> Result<WebhookDelivery, WebhookError>;

    /// One delivery's attempt log, first attempt first.
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::Storage`].
    fn attempts(&self, id: DeliveryId) -> Result<Vec<DeliveryAttempt>, WebhookError>;

    /// Makes a delivery due now.
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::UnknownWebhook`],
    /// [`WebhookError::Inactive`], [`WebhookError::Storage`].
    fn retry(&self, id: DeliveryId) -> Result<WebhookDelivery, WebhookError>;

    /// New deliveries of the webhook's events appended in `since..=until`.
    ///
    /// # Errors
    /// [`WebhookError::InvalidWindow`], [`WebhookError::UnknownWebhook`],
    /// [`WebhookError::Inactive`], [`WebhookError::Unsound`],
    /// [`WebhookError::Storage`].
    fn replay(
        &self,
        id: WebhookId,
        since: Timestamp,
        until: Option<Timestamp>,
    ) -> Result<Vec<DeliveryId>, WebhookError>;
}

/// A running delivery worker.
pub trait Deliverer {
    /// Waits until no delivery is pending or in flight (retries waited
    /// for); false on timeout or failure.
    fn wait_idle(&self, timeout: Option<Duration>) -> bool;

    /// Stops: attempts in flight finish and are recorded.
    fn stop(self);
}

/// Implements [`WebhookRegistry`] for a registry type with the inherent
/// methods of the same names.
macro_rules! registry {
    ($ty:ty) => {
        impl WebhookRegistry for $ty {
            fn allow_private_targets(self, allow: bool) -> Self {
                <$ty>::allow_private_targets(self, allow)
            }
            fn create(&self, new: NewWebhook) -> Result<CreatedWebhook, WebhookError> {
                <$ty>::create(self, new)
            }
            fn get(&self, id: WebhookId) -> Result<Webhook, WebhookError> {
                <$ty>::get(self, id)
            }
            fn list(&self, tenant: Option<&str>) -> Result<Vec<Webhook>, StorageError> {
                <$ty>::list(self, tenant)
            }
            fn update(&self, id: WebhookId, u: WebhookUpdate) -> Result<Webhook, WebhookError> {
                <$ty>::update(self, id, u)
            }
            fn delete(&self, id: WebhookId) -> Result<(), WebhookError> {
                <$ty>::delete(self, id)
            }
            fn rotate_secret(
                &self,
                id: WebhookId,
                secret: Option<&str>,
            ) -> Result<CreatedWebhook, WebhookError> {
                <$ty>::rotate_secret(self, id, secret)
            }
            fn deliveries(&self, q: &DeliveryQuery) -> Result<Vec<WebhookDelivery>, StorageError> {
                <$ty>::deliveries(self, q)
            }
            fn delivery(&self, id: DeliveryId) -> Result<WebhookDelivery, WebhookError> {
                <$ty>::delivery(self, id)
            }
            fn attempts(&self, id: DeliveryId) -> Result<Vec<DeliveryAttempt>, WebhookError> {
                <$ty>::attempts(self, id)
            }
            fn retry(&self, id: DeliveryId) -> Result<WebhookDelivery, WebhookError> {
                <$ty>::retry(self, id)
            }
            fn replay(
                &self,
                id: WebhookId,
                since: Timestamp,
                until: Option<Timestamp>,
            ) -> Result<Vec<DeliveryId>, WebhookError> {
                <$ty>::replay(self, id, since, until)
            }
        }
    };
}

registry!(Webhooks);
#[cfg(feature = "jetstream")]
registry!(crate::JetStreamWebhooks);

impl Deliverer for DeliveryWorker {
    fn wait_idle(&self, timeout: Option<Duration>) -> bool {
        DeliveryWorker::wait_idle(self, timeout)
    }
    fn stop(self) {
        DeliveryWorker::stop(self);
    }
}

#[cfg(feature = "jetstream")]
impl Deliverer for crate::JetStreamDeliveryWorker {
    fn wait_idle(&self, timeout: Option<Duration>) -> bool {
        crate::JetStreamDeliveryWorker::wait_idle(self, timeout)
    }
    fn stop(self) {
        crate::JetStreamDeliveryWorker::stop(self);
    }
}
