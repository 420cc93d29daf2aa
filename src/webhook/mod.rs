//! Webhooks: signing deliveries per [Standard Webhooks] and deciding which
//! target URLs are allowed.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com

pub(crate) mod signing;
pub(crate) mod url_policy;

use crate::durable::Shared;
use crate::error::StorageError;

/// Creates the webhook tables in a new or upgraded log.
pub(crate) fn create_tables(_txn: &redb::WriteTransaction) -> Result<(), StorageError> {
    Ok(())
}

/// Installs the webhook dispatcher on an opened bus.
pub(crate) fn install(_shared: &std::sync::Arc<Shared>) -> Result<(), StorageError> {
    Ok(())
}
