//! Delivery records: creating one (with its due entry and index entry)
//! and failing the pending ones of a webhook.

use super::*;

/// Creates a pending delivery, due at `due_ns`.
pub(crate) fn insert_delivery(
    deliveries: &mut redb::Table<'_, [u8; 16], &'static [u8]>,
    due: &mut redb::Table<'_, (i64, [u8; 16]), ()>,
    by_hook: &mut redb::Table<'_, ([u8; 16], [u8; 16]), ()>,
    hook: [u8; 16],
    event: EventId,
    seq: u64,
    now: i64,
) -> Result<DeliveryId, StorageError> {
    let id = DeliveryId::new();
    let key = id.to_bytes();
    let rec = DeliRec {
        created_ns: now,
        updated_ns: now,
        webhook: hook,
        event: event.to_bytes(),
        seq,
        status: DeliveryStatus::Pending,
        status_code: 0,
        attempts: 0,
        next_retry_ns: Some(now),
        error: String::new(),
    };
    deliveries.insert(key, encode_record(&rec).as_slice())?;
    due.insert((now, key), ())?;
    by_hook.insert((hook, key), ())?;
    Ok(id)
}

/// Marks every pending delivery of `hook` failed with `reason` and removes
/// it from the due queue.
pub(crate) fn fail_pending(
    txn: &redb::WriteTransaction,
    hook: &[u8; 16],
    reason: &str,
    now: i64,
) -> Result<(), StorageError> {
    let by_hook = txn.open_table(BY_HOOK)?;
    let mut deliveries = txn.open_table(DELIVERIES)?;
    let mut due = txn.open_table(DUE)?;
    let ids: Vec<[u8; 16]> = by_hook
        .range((*hook, [0u8; 16])..=(*hook, [0xffu8; 16]))?
        .map(|r| r.map(|(k, _)| k.value().1))
        .collect::<Result<_, _>>()?;
    for d in ids {
        let rec = match deliveries.get(d)? {
            Some(v) => decode_deli(v.value(), &d)?,
            None => continue,
        };
        if rec.status != DeliveryStatus::Pending {
            continue;
        }
        let mut rec = rec;
        if let Some(at) = rec.next_retry_ns.take() {
            due.remove((at, d))?;
        }
        rec.status = DeliveryStatus::Failed;
        reason.clone_into(&mut rec.error);
        rec.updated_ns = now;
        deliveries.insert(d, encode_record(&rec).as_slice())?;
    }
    Ok(())
}

/// Disables a webhook (recording why) and fails its pending deliveries.
pub(crate) fn disable_in(
    txn: &redb::WriteTransaction,
    id: &[u8; 16],
    rec: &mut HookRec,
    reason: &str,
    now: i64,
) -> Result<(), StorageError> {
    rec.active = false;
    rec.disabled_reason = Some(reason.to_owned());
    rec.updated_ns = now;
    store_hook(txn, id, rec)?;
    bump_version(txn)?;
    fail_pending(txn, id, &format!("webhook disabled: {reason}"), now)
}
