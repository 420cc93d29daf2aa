//! Read-only listings, shared by the bus handle and `ReadOnlyLog`.

use super::*;

// ---- read-only listings (shared by the bus handle and `ReadOnlyLog`) ----

/// A read transaction, or `None` when the file has no webhook tables yet
/// (a log created by an older build, read from another process).
pub(crate) fn read_txn<D: ReadableDatabase>(db: &D) -> Result<redb::ReadTransaction, StorageError> {
    Ok(db.begin_read()?)
}

pub(crate) fn missing(e: &redb::TableError) -> bool {
    matches!(e, redb::TableError::TableDoesNotExist(_))
}

pub(crate) fn list_webhooks<D: ReadableDatabase>(
    db: &D,
    tenant: Option<&str>,
) -> Result<Vec<Webhook>, StorageError> {
    let txn = read_txn(db)?;
    let table = match txn.open_table(WEBHOOKS) {
        Ok(t) => t,
        Err(e) if missing(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let id = k.value();
        let rec = decode_hook(v.value(), &id)?;
        if tenant.is_none_or(|t| t == rec.tenant_id) {
            out.push(to_webhook(id, &rec));
        }
    }
    Ok(out)
}

pub(crate) fn get_webhook<D: ReadableDatabase>(
    db: &D,
    id: WebhookId,
) -> Result<Webhook, WebhookError> {
    let txn = read_txn(db)?;
    let table = match txn.open_table(WEBHOOKS) {
        Ok(t) => t,
        Err(e) if missing(&e) => return Err(WebhookError::UnknownWebhook(id)),
        Err(e) => return Err(StorageError::from(e).into()),
    };
    let key = id.to_bytes();
    let Some(v) = table.get(key).map_err(StorageError::from)? else {
        return Err(WebhookError::UnknownWebhook(id));
    };
    Ok(to_webhook(key, &decode_hook(v.value(), &key)?))
}

pub(crate) fn list_deliveries<D: ReadableDatabase>(
    db: &D,
    q: &DeliveryQuery,
) -> Result<Vec<WebhookDelivery>, StorageError> {
    let txn = read_txn(db)?;
    let table = match txn.open_table(DELIVERIES) {
        Ok(t) => t,
        Err(e) if missing(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let limit = q.limit.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    let take = |id: [u8; 16],
                bytes: &[u8],
                out: &mut Vec<WebhookDelivery>|
     -> Result<bool, StorageError> {
        let rec = decode_deli(bytes, &id)?;
        if q.status.is_none_or(|s| s == rec.status) {
            out.push(to_delivery(id, &rec));
        }
        Ok(out.len() < limit)
    };
    if let Some(hook) = q.webhook_id {
        let by_hook = txn.open_table(BY_HOOK)?;
        let h = hook.to_bytes();
        for row in by_hook.range((h, [0u8; 16])..=(h, [0xffu8; 16]))? {
            let (k, _) = row?;
            let (_, d) = k.value();
            if let Some(v) = table.get(d)?
                && !take(d, v.value(), &mut out)?
            {
                break;
            }
        }
    } else {
        for row in table.iter()? {
            let (k, v) = row?;
            if !take(k.value(), v.value(), &mut out)? {
                break;
            }
        }
    }
    Ok(out)
}

pub(crate) fn get_delivery<D: ReadableDatabase>(
    db: &D,
    id: DeliveryId,
) -> Result<WebhookDelivery, WebhookError> {
    let txn = read_txn(db)?;
    let table = match txn.open_table(DELIVERIES) {
        Ok(t) => t,
        Err(e) if missing(&e) => return Err(WebhookError::UnknownDelivery(id)),
        Err(e) => return Err(StorageError::from(e).into()),
    };
    let key = id.to_bytes();
    let Some(v) = table.get(key).map_err(StorageError::from)? else {
        return Err(WebhookError::UnknownDelivery(id));
    };
    Ok(to_delivery(key, &decode_deli(v.value(), &key)?))
}

pub(crate) fn list_attempts<D: ReadableDatabase>(
    db: &D,
    id: DeliveryId,
) -> Result<Vec<DeliveryAttempt>, WebhookError> {
    // Refuse an unknown id clearly rather than answer "no attempts".
    get_delivery(db, id)?;
    let txn = read_txn(db)?;
    let table = txn.open_table(ATTEMPTS).map_err(StorageError::from)?;
    let key = id.to_bytes();
    let mut out = Vec::new();
    for row in table
        .range((key, 0)..=(key, u32::MAX))
        .map_err(StorageError::from)?
    {
        let (k, v) = row.map_err(StorageError::from)?;
        let (_, n) = k.value();
        let rec: AttemptRec = decode_record(v.value(), "webhook_attempts", format!("{id}/{n}"))?;
        out.push(DeliveryAttempt {
            attempt: n,
            at: ts(rec.at_ns),
            status_code: rec.status_code,
            duration_ms: rec.duration_us / 1000,
            error: rec.error,
            response: rec.response,
        });
    }
    Ok(out)
}
