//! Delivery records and their states. [`transition`] is the one place a
//! delivery changes state, keeping the invariant every scan relies on:
//! a delivery is `Pending` exactly when it has `next_retry_ns = Some(at)`
//! and one due-queue entry `(at, id)`; `Succeeded` and `Failed` ones have
//! neither.

use super::*;

/// The state a delivery moves to.
pub(crate) enum Next<'a> {
    /// Pending, due at this time (unix ns). Coming from another state, its
    /// old error is cleared.
    Due(i64),
    /// An attempt succeeded.
    Succeeded,
    /// Failed for good, with the reason.
    Failed(&'a str),
}

/// Moves the delivery `id` (whose record is `rec`) to `next`: its due entry
/// removed and, if pending again, put back at the new time; the record
/// stored.
pub(crate) fn transition(
    deliveries: &mut redb::Table<'_, [u8; 16], &'static [u8]>,
    due: &mut redb::Table<'_, (i64, [u8; 16]), ()>,
    id: &[u8; 16],
    rec: &mut DeliRec,
    next: Next<'_>,
    now: i64,
) -> Result<(), StorageError> {
    if let Some(at) = rec.next_retry_ns.take() {
        due.remove((at, *id))?;
    }
    match next {
        Next::Due(at) => {
            if rec.status != DeliveryStatus::Pending {
                rec.error.clear();
            }
            rec.status = DeliveryStatus::Pending;
            rec.next_retry_ns = Some(at);
            due.insert((at, *id), ())?;
        }
        Next::Succeeded => {
            rec.status = DeliveryStatus::Succeeded;
            rec.error.clear();
        }
        Next::Failed(reason) => {
            rec.status = DeliveryStatus::Failed;
            reason.clone_into(&mut rec.error);
        }
    }
    rec.updated_ns = now;
    deliveries.insert(*id, encode_record(rec).as_slice())?;
    Ok(())
}

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
    let mut rec = DeliRec {
        created_ns: now,
        updated_ns: now,
        webhook: hook,
        event: event.to_bytes(),
        seq,
        status: DeliveryStatus::Pending,
        status_code: 0,
        attempts: 0,
        next_retry_ns: None,
        error: String::new(),
    };
    transition(deliveries, due, &key, &mut rec, Next::Due(now), now)?;
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
        transition(
            &mut deliveries,
            &mut due,
            &d,
            &mut rec,
            Next::Failed(reason),
            now,
        )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Pending exactly when there is one due entry at `next_retry_ns`.
    fn assert_invariant(
        deliveries: &redb::Table<'_, [u8; 16], &'static [u8]>,
        due: &redb::Table<'_, (i64, [u8; 16]), ()>,
        id: &[u8; 16],
    ) -> DeliRec {
        let rec = decode_deli(deliveries.get(id).unwrap().unwrap().value(), id).unwrap();
        let entries: Vec<(i64, [u8; 16])> = due
            .iter()
            .unwrap()
            .map(|r| r.unwrap().0.value())
            .filter(|(_, d)| d == id)
            .collect();
        if rec.status == DeliveryStatus::Pending {
            let at = rec
                .next_retry_ns
                .expect("a pending delivery has a due time");
            assert_eq!(entries, vec![(at, *id)]);
        } else {
            assert_eq!(rec.next_retry_ns, None);
            assert!(entries.is_empty(), "{entries:?}");
        }
        rec
    }

    #[test]
    fn every_transition_keeps_pending_and_the_due_queue_in_step() {
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut deliveries = txn.open_table(DELIVERIES).unwrap();
            let mut due = txn.open_table(DUE).unwrap();
            let mut by_hook = txn.open_table(BY_HOOK).unwrap();
            let id = insert_delivery(
                &mut deliveries,
                &mut due,
                &mut by_hook,
                [1; 16],
                EventId::new(),
                7,
                100,
            )
            .unwrap()
            .to_bytes();
            let mut rec = assert_invariant(&deliveries, &due, &id);
            assert_eq!(rec.next_retry_ns, Some(100));
            for (next, status) in [
                (Next::Due(500), DeliveryStatus::Pending),
                (Next::Failed("gone"), DeliveryStatus::Failed),
                (Next::Due(900), DeliveryStatus::Pending),
                (Next::Succeeded, DeliveryStatus::Succeeded),
                (Next::Due(1000), DeliveryStatus::Pending),
            ] {
                transition(&mut deliveries, &mut due, &id, &mut rec, next, 200).unwrap();
                rec = assert_invariant(&deliveries, &due, &id);
                assert_eq!(rec.status, status);
            }
            // Back to pending from a failure clears the old error.
            transition(
                &mut deliveries,
                &mut due,
                &id,
                &mut rec,
                Next::Failed("x"),
                300,
            )
            .unwrap();
            assert_eq!(rec.error, "x");
            transition(
                &mut deliveries,
                &mut due,
                &id,
                &mut rec,
                Next::Due(400),
                300,
            )
            .unwrap();
            assert!(rec.error.is_empty());
        }
        txn.commit().unwrap();
    }
}
