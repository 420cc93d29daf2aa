//! [`Webhooks`]: the registry handle of a bus, and its writes.

use super::*;

/// Default time the previous secret keeps signing after a rotation.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Longest tenant id accepted for a webhook, in bytes.
pub(crate) const MAX_TENANT_LEN: usize = 256;

// ---- writes ----

pub(crate) fn write_txn(shared: &Shared) -> Result<redb::WriteTransaction, StorageError> {
    crate::durable::txn::write(shared)
}

/// Bumps the registry version (the dispatcher reloads its cache).
pub(crate) fn bump_version(txn: &redb::WriteTransaction) -> Result<(), StorageError> {
    let mut meta = txn.open_table(HOOK_META)?;
    let v = meta.get(META_VERSION)?.map_or(0, |g| g.value());
    meta.insert(META_VERSION, v + 1)?;
    Ok(())
}

pub(crate) fn load_hook(
    txn: &redb::WriteTransaction,
    id: &[u8; 16],
) -> Result<Option<HookRec>, StorageError> {
    let table = txn.open_table(WEBHOOKS)?;
    let out = match table.get(id)? {
        Some(v) => Some(decode_hook(v.value(), id)?),
        None => None,
    };
    Ok(out)
}

pub(crate) fn store_hook(
    txn: &redb::WriteTransaction,
    id: &[u8; 16],
    rec: &HookRec,
) -> Result<(), StorageError> {
    txn.open_table(WEBHOOKS)?
        .insert(id, encode_record(rec).as_slice())?;
    Ok(())
}

/// The webhook registry of a [`DurableBus`]: create, change and remove
/// webhooks, inspect, retry and replay deliveries. Get one with
/// [`DurableBus::webhooks`].
///
/// Every change is one durable write transaction: when a method returns
/// `Ok`, the change is on disk, and every event committed after it is
/// dispatched by the new registry state (G8). On error nothing is written.
#[derive(Clone)]
pub struct Webhooks {
    /// Held for read-your-writes (`sync_reads`) and the shared state.
    bus: DurableBus,
    shared: Arc<Shared>,
    policy: UrlPolicy,
    grace: Duration,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("allow_private_targets", &self.policy.allow_private)
            .field("rotation_grace", &self.grace)
            .finish()
    }
}

impl Webhooks {
    /// The registry of `bus`, with the default URL policy and grace.
    pub(crate) fn of(bus: &DurableBus) -> Webhooks {
        Webhooks {
            bus: bus.clone(),
            shared: bus.shared().clone(),
            policy: UrlPolicy::default(),
            grace: DEFAULT_ROTATION_GRACE,
        }
    }
}

/// The webhook listings of a log read from outside (`ReadOnlyLog`).
pub(crate) mod read_only {
    use super::*;

    pub(crate) fn webhooks(
        log: &ReadOnlyLog,
        tenant: Option<&str>,
    ) -> Result<Vec<Webhook>, StorageError> {
        list_webhooks(log.database(), tenant)
    }

    pub(crate) fn webhook(log: &ReadOnlyLog, id: WebhookId) -> Result<Webhook, WebhookError> {
        get_webhook(log.database(), id)
    }

    pub(crate) fn deliveries(
        log: &ReadOnlyLog,
        q: &DeliveryQuery,
    ) -> Result<Vec<WebhookDelivery>, StorageError> {
        list_deliveries(log.database(), q)
    }

    pub(crate) fn delivery(
        log: &ReadOnlyLog,
        id: DeliveryId,
    ) -> Result<WebhookDelivery, WebhookError> {
        get_delivery(log.database(), id)
    }

    pub(crate) fn attempts(
        log: &ReadOnlyLog,
        id: DeliveryId,
    ) -> Result<Vec<DeliveryAttempt>, WebhookError> {
        list_attempts(log.database(), id)
    }
}

pub(crate) fn check_tenant(t: &str) -> Result<(), WebhookError> {
    if t.is_empty() || t.len() > MAX_TENANT_LEN || t.chars().any(char::is_control) {
        return Err(WebhookError::InvalidTenant(t.to_owned()));
    }
    Ok(())
}

pub(crate) fn parse_patterns(events: &[String]) -> Result<Vec<String>, WebhookError> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let p = Pattern::new(e.as_str())?;
        if !out.contains(&p.as_str().to_owned()) {
            out.push(p.as_str().to_owned());
        }
    }
    Ok(out)
}

impl Webhooks {
    /// Allows targets on loopback, private, link-local and other reserved
    /// addresses (default off; for development and tests).
    pub fn allow_private_targets(mut self, allow: bool) -> Self {
        self.policy.allow_private = allow;
        self
    }

    /// How long the previous secret keeps signing after
    /// [`Webhooks::rotate_secret`] (default 24 h).
    pub fn rotation_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    fn check_url(&self, url: &str) -> Result<(), WebhookError> {
        let target = validate_url(url)?;
        self.policy.check(&target)?;
        Ok(())
    }

    /// Read-your-writes: waits until every acknowledged event is in the
    /// redb file (with a write-ahead log, events are applied to it, and
    /// their deliveries created, a little after `publish` returns). Best
    /// effort: a closed or poisoned bus still serves what is in the file.
    /// Waits until every acknowledged event is applied, with the deliveries
    /// it created, so that what follows sees them.
    fn sync(&self) -> Result<(), StorageError> {
        self.bus.sync_reads()
    }

    /// A write transaction, after every acknowledged event was applied with
    /// the registry as it was when it was published.
    fn open(&self) -> Result<redb::WriteTransaction, WebhookError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(WebhookError::Closed);
        }
        self.sync()?;
        Ok(write_txn(&self.shared)?)
    }

    fn commit(&self, txn: redb::WriteTransaction) -> Result<(), WebhookError> {
        txn.commit().map_err(StorageError::from)?;
        crate::webhook::dispatch::wake(&self.shared);
        Ok(())
    }

    /// Registers a webhook. Its secret is `new.secret`, or a generated one
    /// (`whsec_` + base64 of 32 random bytes); this is the only time it is
    /// returned, besides [`Webhooks::rotate_secret`].
    ///
    /// Every event of the tenant committed after this returns and matching
    /// a pattern gets a delivery.
    ///
    /// # Errors
    /// [`WebhookError::InvalidTenant`], [`WebhookError::Url`] (including a
    /// private target without [`Webhooks::allow_private_targets`]),
    /// [`WebhookError::Secret`], [`WebhookError::Pattern`]: nothing written.
    /// [`WebhookError::Storage`], [`WebhookError::Closed`].
    pub fn create(&self, new: NewWebhook) -> Result<CreatedWebhook, WebhookError> {
        check_tenant(&new.tenant_id)?;
        self.check_url(&new.url)?;
        let events = parse_patterns(&new.events)?;
        let secret = match &new.secret {
            Some(s) => Secret::parse(s)?,
            None => Secret::generate(),
        };
        let id = WebhookId::new();
        let key = id.to_bytes();
        let now = now_ns();
        let rec = HookRec {
            created_ns: now,
            updated_ns: now,
            tenant_id: new.tenant_id,
            url: new.url,
            events,
            active: true,
            disabled_reason: None,
            secret: secret.expose().to_owned(),
            prev_secret: None,
            failing_since_ns: None,
        };
        let txn = self.open()?;
        store_hook(&txn, &key, &rec)?;
        bump_version(&txn)?;
        self.commit(txn)?;
        Ok(CreatedWebhook {
            webhook: to_webhook(key, &rec),
            secret,
        })
    }

    /// One webhook.
    ///
    /// # Errors
    /// [`WebhookError::UnknownWebhook`], [`WebhookError::Storage`].
    pub fn get(&self, id: WebhookId) -> Result<Webhook, WebhookError> {
        self.sync()?;
        get_webhook(&self.shared.db, id)
    }

    /// Every webhook, or those of one tenant, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails or a record is corrupted.
    pub fn list(&self, tenant: Option<&str>) -> Result<Vec<Webhook>, StorageError> {
        self.sync()?;
        list_webhooks(&self.shared.db, tenant)
    }

    /// Runs `f` on a webhook's record in one write transaction.
    fn modify(
        &self,
        id: WebhookId,
        f: impl FnOnce(&redb::WriteTransaction, &mut HookRec, i64) -> Result<(), WebhookError>,
    ) -> Result<HookRec, WebhookError> {
        let key = id.to_bytes();
        let txn = self.open()?;
        let Some(mut rec) = load_hook(&txn, &key)? else {
            return Err(WebhookError::UnknownWebhook(id));
        };
        let now = now_ns();
        f(&txn, &mut rec, now)?;
        rec.updated_ns = now;
        store_hook(&txn, &key, &rec)?;
        bump_version(&txn)?;
        self.commit(txn)?;
        Ok(rec)
    }

    /// Changes a webhook's URL, patterns or state. Enabling clears the
    /// disabled reason and the failure clock; disabling fails its pending
    /// deliveries (replay or retry them after enabling it again).
    ///
    /// # Errors
    /// [`WebhookError::UnknownWebhook`], [`WebhookError::Url`],
    /// [`WebhookError::Pattern`]: nothing written. [`WebhookError::Storage`].
    pub fn update(&self, id: WebhookId, update: WebhookUpdate) -> Result<Webhook, WebhookError> {
        if let Some(url) = &update.url {
            self.check_url(url)?;
        }
        let events = update.events.as_deref().map(parse_patterns).transpose()?;
        let rec = self.modify(id, |txn, rec, now| {
            let disabled =
                rec.apply_update(update.url.as_deref(), events.as_deref(), update.active);
            if let Some(reason) = disabled {
                fail_pending(txn, &id.to_bytes(), reason, now)?;
            }
            Ok(())
        })?;
        Ok(to_webhook(id.to_bytes(), &rec))
    }

    /// Enables a webhook.
    ///
    /// # Errors
    /// As [`Webhooks::update`].
    pub fn enable(&self, id: WebhookId) -> Result<Webhook, WebhookError> {
        self.update(id, WebhookUpdate::state(true))
    }

    /// Disables a webhook: no new deliveries, its pending ones fail.
    ///
    /// # Errors
    /// As [`Webhooks::update`].
    pub fn disable(&self, id: WebhookId) -> Result<Webhook, WebhookError> {
        self.update(id, WebhookUpdate::state(false))
    }

    /// Deletes a webhook. Its pending deliveries are failed ("webhook
    /// deleted") and never attempted again; delivery records and attempt
    /// logs stay for audit.
    ///
    /// # Errors
    /// [`WebhookError::UnknownWebhook`], [`WebhookError::Storage`].
    pub fn delete(&self, id: WebhookId) -> Result<(), WebhookError> {
        let key = id.to_bytes();
        let txn = self.open()?;
        if load_hook(&txn, &key)?.is_none() {
            return Err(WebhookError::UnknownWebhook(id));
        }
        txn.open_table(WEBHOOKS)
            .map_err(StorageError::from)?
            .remove(key)
            .map_err(StorageError::from)?;
        fail_pending(&txn, &key, "webhook deleted", now_ns())?;
        bump_version(&txn)?;
        self.commit(txn)
    }

    /// Replaces a webhook's secret with `secret` (or a generated one). The
    /// previous secret keeps signing, beside the new one in the
    /// `webhook-signature` header, for the rotation grace period (default
    /// 24 h), so receivers can switch without losing messages.
    ///
    /// # Errors
    /// [`WebhookError::Secret`], [`WebhookError::UnknownWebhook`]: nothing
    /// written. [`WebhookError::Storage`].
    pub fn rotate_secret(
        &self,
        id: WebhookId,
        secret: Option<&str>,
    ) -> Result<CreatedWebhook, WebhookError> {
        let secret = match secret {
            Some(s) => Secret::parse(s)?,
            None => Secret::generate(),
        };
        let grace = i64::try_from(self.grace.as_nanos()).unwrap_or(i64::MAX);
        let rec = self.modify(id, |_, rec, now| {
            let old = std::mem::replace(&mut rec.secret, secret.expose().to_owned());
            rec.prev_secret = Some((old, now.saturating_add(grace)));
            Ok(())
        })?;
        Ok(CreatedWebhook {
            webhook: to_webhook(id.to_bytes(), &rec),
            secret,
        })
    }

    /// Deliveries, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails or a record is corrupted.
    pub fn deliveries(&self, q: &DeliveryQuery) -> Result<Vec<WebhookDelivery>, StorageError> {
        self.sync()?;
        list_deliveries(&self.shared.db, q)
    }

    /// One delivery.
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::Storage`].
    pub fn delivery(&self, id: DeliveryId) -> Result<WebhookDelivery, WebhookError> {
        self.sync()?;
        get_delivery(&self.shared.db, id)
    }

    /// The attempt log of one delivery, first attempt first.
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::Storage`].
    pub fn attempts(&self, id: DeliveryId) -> Result<Vec<DeliveryAttempt>, WebhookError> {
        self.sync()?;
        list_attempts(&self.shared.db, id)
    }

    /// Makes a delivery due now: a pending one skips its wait; a failed or
    /// succeeded one becomes pending again for one more attempt (its
    /// attempt count goes on, so a failure fails it again).
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::UnknownWebhook`]
    /// (deleted), [`WebhookError::Inactive`]: nothing written.
    /// [`WebhookError::Storage`].
    pub fn retry(&self, id: DeliveryId) -> Result<WebhookDelivery, WebhookError> {
        let key = id.to_bytes();
        let txn = self.open()?;
        let rec = {
            let deliveries = txn.open_table(DELIVERIES).map_err(StorageError::from)?;
            let Some(v) = deliveries.get(key).map_err(StorageError::from)? else {
                return Err(WebhookError::UnknownDelivery(id));
            };
            decode_deli(v.value(), &key)?
        };
        let hook = WebhookId::from_bytes(rec.webhook);
        match load_hook(&txn, &rec.webhook)? {
            None => return Err(WebhookError::UnknownWebhook(hook)),
            Some(h) if !h.active => return Err(WebhookError::Inactive(hook)),
            Some(_) => {}
        }
        let now = now_ns();
        let mut rec = rec;
        {
            let mut deliveries = txn.open_table(DELIVERIES).map_err(StorageError::from)?;
            let mut due = txn.open_table(DUE).map_err(StorageError::from)?;
            transition(
                &mut deliveries,
                &mut due,
                &key,
                &mut rec,
                Next::Due(now),
                now,
            )?;
        }
        self.commit(txn)?;
        Ok(to_delivery(key, &rec))
    }

    /// Creates a new delivery for every event of the webhook's tenant that
    /// matches its patterns and was appended at or after `since` (and not
    /// after `until`, when given). Returns the new deliveries' ids, in log
    /// order. Receivers see the same `webhook-id` (event id) as before and
    /// can de-duplicate.
    ///
    /// # Errors
    /// [`WebhookError::InvalidWindow`], [`WebhookError::UnknownWebhook`],
    /// [`WebhookError::Inactive`]: nothing written.
    /// [`WebhookError::Storage`].
    pub fn replay(
        &self,
        id: WebhookId,
        since: Timestamp,
        until: Option<Timestamp>,
    ) -> Result<Vec<DeliveryId>, WebhookError> {
        if until.is_some_and(|u| u < since) {
            return Err(WebhookError::InvalidWindow);
        }
        let key = id.to_bytes();
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(WebhookError::Closed);
        }
        self.sync()?;
        // 1. Find the events with a read transaction: the scan never holds
        // the write lock (the applier, and with it every in-process read,
        // would wait for it).
        let check = |hook: Option<HookRec>| -> Result<HookRec, WebhookError> {
            match hook {
                None => Err(WebhookError::UnknownWebhook(id)),
                Some(h) if !h.active => Err(WebhookError::Inactive(id)),
                Some(h) => match h.unsound(now_ns()) {
                    Some(reason) => Err(WebhookError::Unsound { id, reason }),
                    None => Ok(h),
                },
            }
        };
        let read_hook = || -> Result<HookRec, WebhookError> {
            let txn = self.shared.db.begin_read().map_err(StorageError::from)?;
            let table = txn.open_table(WEBHOOKS).map_err(StorageError::from)?;
            let found = match table.get(key).map_err(StorageError::from)? {
                Some(v) => Some(decode_hook(v.value(), &key)?),
                None => None,
            };
            check(found)
        };
        let map_read = |e: crate::error::ReadError| match e {
            crate::error::ReadError::Storage(s) => WebhookError::Storage(s),
            other => WebhookError::Storage(StorageError::Corrupted {
                table: "events",
                key: String::new(),
                reason: other.to_string(),
            }),
        };
        let scan = |hook: &HookRec| -> Result<Vec<(u64, crate::id::EventId)>, WebhookError> {
            let filter = Filter {
                types: hook.patterns().unwrap_or_default(),
                tenant_id: Some(hook.tenant_id.clone()),
                instance_id: None,
            };
            let mut reader =
                crate::durable::LogReader::new(&self.shared.db, Position::Time(since), &filter)
                    .map_err(map_read)?;
            if let Some(u) = until {
                reader = reader.until(u);
            }
            // 24 bytes an event: a window of a million events takes 24 MB.
            reader
                .map(|entry| entry.map(|e| (e.seq, e.event.id)).map_err(map_read))
                .collect()
        };
        let mut tries = 0;
        let (txn, found) = loop {
            tries += 1;
            let hook = read_hook()?;
            let found = scan(&hook)?;
            // 2. Create the deliveries in one write transaction, with the
            // webhook checked again: if its tenant or patterns changed
            // meanwhile, scan again (three times at most; the last time the
            // scan runs under the write lock, so nothing can change).
            let txn = self.open()?;
            let now_hook = check(load_hook(&txn, &key)?)?;
            if now_hook.tenant_id == hook.tenant_id && now_hook.events == hook.events {
                break (txn, found);
            }
            if tries >= 3 {
                let found = scan(&now_hook)?;
                break (txn, found);
            }
        };
        let now = now_ns();
        let mut ids = Vec::with_capacity(found.len());
        {
            let mut deliveries = txn.open_table(DELIVERIES).map_err(StorageError::from)?;
            let mut due = txn.open_table(DUE).map_err(StorageError::from)?;
            let mut by_hook = txn.open_table(BY_HOOK).map_err(StorageError::from)?;
            for (seq, event_id) in found {
                ids.push(insert_delivery(
                    &mut deliveries,
                    &mut due,
                    &mut by_hook,
                    key,
                    event_id,
                    seq,
                    now,
                )?);
            }
        }
        self.commit(txn)?;
        Ok(ids)
    }
}
