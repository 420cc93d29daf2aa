//! Webhooks on JetStream: the registry and the delivery records in KV
//! buckets of the cluster, so that every replica of a control plane sees
//! the same webhooks and shares the same deliveries.
//!
//! - `<stream>_webhooks`: webhook id → the stored webhook (as on a file,
//!   its secret included, plus `from_seq`, below), JSON.
//! - `<stream>_deliveries`: delivery id → the delivery, its attempt log and
//!   its job generation, JSON. Changes are compare-and-set on the entry's
//!   revision, so concurrent writers never lose each other's changes.
//! - `<stream>_jobs`: a work-queue stream of delivery jobs (`delivery`
//!   below), one live job per pending delivery.
//!
//! A webhook receives the events after `from_seq`, the log's last `seq`
//! once it was stored: creation stores it first without `from_seq`
//! (provisional: the dispatcher holds back that tenant's events for a
//! moment rather than decide without it), then reads the log's end and
//! sets it. So an event appended after `create` returned always gets its
//! delivery, and one appended before it started never does.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{JetStreamBus, cluster};
use crate::durable::Position;
use crate::error::{StorageError, WebhookError};
use crate::filter::Filter;
use crate::id::{DeliveryId, EventId, WebhookId};
use crate::webhook::signing::Secret;
use crate::webhook::store::{
    AttemptRec, DEFAULT_ROTATION_GRACE, DeliRec, HookRec, check_tenant, now_ns, parse_patterns,
    to_delivery, to_webhook, ts,
};
use crate::webhook::url_policy::{UrlPolicy, validate_url};
use crate::webhook::{
    CreatedWebhook, DeliveryAttempt, DeliveryQuery, DeliveryStatus, NewWebhook, Webhook,
    WebhookDelivery, WebhookUpdate,
};

/// How long a provisional webhook (stored, `from_seq` not yet set) holds
/// back its tenant's events before the dispatcher takes its creator for
/// dead and ignores it.
pub(super) const PROVISIONAL_FOR: Duration = Duration::from_secs(30);

/// A webhook as stored in the registry bucket.
#[derive(Serialize, Deserialize, Clone)]
pub(super) struct StoredHook {
    #[serde(flatten)]
    pub(super) rec: HookRec,
    /// It receives events with a larger `seq`; `None` while provisional.
    pub(super) from_seq: Option<u64>,
}

/// A delivery as stored in the deliveries bucket.
#[derive(Serialize, Deserialize, Clone)]
pub(super) struct StoredDelivery {
    #[serde(flatten)]
    pub(super) rec: DeliRec,
    /// Every attempt, first first.
    pub(super) log: Vec<AttemptRec>,
    /// The generation of its live job: a job of another generation is
    /// stale (replaced by a manual retry) and is dropped.
    pub(super) generation: u32,
}

/// The cluster's handles of the webhook state of one log.
#[derive(Clone)]
pub(super) struct Stores {
    pub(super) hooks: kv::Store,
    pub(super) deliveries: kv::Store,
    pub(super) jobs: jetstream::stream::Stream,
    pub(super) jobs_name: String,
    js: jetstream::Context,
}

/// How much a bucket holds, asked of the servers (`kv::Store::status` is
/// the state when the handle was made).
pub(super) struct BucketState {
    /// Messages, delete markers included.
    pub(super) messages: u64,
    /// The newest message's sequence: it changes with every write.
    pub(super) last_sequence: u64,
}

impl Stores {
    /// The buckets and the jobs stream of `bus`, created if missing.
    pub(super) async fn open(bus: &JetStreamBus) -> Result<Stores, StorageError> {
        let inner = &bus.inner;
        let js = inner.js();
        let bucket = |suffix: &str| format!("{}_{suffix}", inner.stream);
        let hooks = kv_bucket(js, bucket("webhooks"), inner.replicas).await?;
        let deliveries = kv_bucket(js, bucket("deliveries"), inner.replicas).await?;
        let jobs_name = bucket("jobs");
        let jobs = js
            .get_or_create_stream(jetstream::stream::Config {
                name: jobs_name.clone(),
                subjects: vec![format!("{jobs_name}.>")],
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                num_replicas: inner.replicas,
                duplicate_window: inner.opts.duplicate_window,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(cluster)?;
        Ok(Stores {
            hooks,
            deliveries,
            jobs,
            jobs_name,
            js: js.clone(),
        })
    }

    /// The state of the bucket `store` now: one stream-info request on the
    /// bucket's own stream handle (dispatch asks before every event; it
    /// used to look the stream up first, a second request each time).
    pub(super) async fn state(&self, store: &kv::Store) -> Result<BucketState, StorageError> {
        let mut stream = store.stream.clone();
        let info = stream.info().await.map_err(cluster)?;
        Ok(BucketState {
            messages: info.state.messages,
            last_sequence: info.state.last_sequence,
        })
    }

    /// Every live entry of `store`, by key.
    pub(super) async fn all(
        &self,
        store: &kv::Store,
    ) -> Result<Vec<(String, Bytes)>, StorageError> {
        if self.state(store).await?.messages == 0 {
            return Ok(Vec::new());
        }
        let mut watch = store.watch_with_history(">").await.map_err(cluster)?;
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .map_err(|_| cluster("listing a bucket timed out"))?;
            let Some(entry) = next else { break };
            let entry = entry.map_err(cluster)?;
            let last = entry.delta == 0;
            if entry.operation == kv::Operation::Put {
                out.push((entry.key, entry.value));
            }
            if last {
                break;
            }
        }
        Ok(out)
    }

    /// Every webhook, by id; an entry that doesn't decode is an error.
    pub(super) async fn hooks(&self) -> Result<Vec<(WebhookId, StoredHook)>, StorageError> {
        let mut out = Vec::new();
        for (key, value) in self.all(&self.hooks).await? {
            out.push(decode_hook(&key, &value)?);
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// Every webhook that decodes, by id, for dispatch: a damaged entry is
    /// logged and gets no deliveries, and holds up no other webhook's.
    pub(super) async fn sound_hooks(&self) -> Result<Vec<(WebhookId, StoredHook)>, StorageError> {
        let mut out = Vec::new();
        for (key, value) in self.all(&self.hooks).await? {
            match decode_hook(&key, &value) {
                Ok(hook) => out.push(hook),
                Err(e) => tracing::error!(error = %e, "dispatch: a damaged webhook is skipped"),
            }
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// One webhook and its entry's revision.
    pub(super) async fn hook(
        &self,
        id: WebhookId,
    ) -> Result<Option<(StoredHook, u64)>, StorageError> {
        let key = id.to_string();
        match self.hooks.entry(key.clone()).await.map_err(cluster)? {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((decode(&e.value, "webhooks", &key)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// One delivery and its entry's revision.
    pub(super) async fn delivery(
        &self,
        id: DeliveryId,
    ) -> Result<Option<(StoredDelivery, u64)>, StorageError> {
        let key = id.to_string();
        match self.deliveries.entry(key.clone()).await.map_err(cluster)? {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((decode(&e.value, "deliveries", &key)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Changes a webhook with `f`, compare-and-set, again on a concurrent
    /// change; `Ok(None)` when it doesn't exist.
    pub(super) async fn modify_hook<T>(
        &self,
        id: WebhookId,
        mut f: impl FnMut(&mut StoredHook) -> Result<T, WebhookError>,
    ) -> Result<Option<(StoredHook, T)>, WebhookError> {
        loop {
            let Some((mut hook, revision)) = self.hook(id).await? else {
                return Ok(None);
            };
            let out = f(&mut hook)?;
            match self
                .hooks
                .update(id.to_string(), encode(&hook), revision)
                .await
            {
                Ok(_) => return Ok(Some((hook, out))),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(cluster(e).into()),
            }
        }
    }

    /// Changes a delivery with `f`, compare-and-set, again on a concurrent
    /// change; `Ok(None)` when it doesn't exist.
    pub(super) async fn modify_delivery<T>(
        &self,
        id: DeliveryId,
        mut f: impl FnMut(&mut StoredDelivery) -> T,
    ) -> Result<Option<(StoredDelivery, T)>, StorageError> {
        loop {
            let Some((mut d, revision)) = self.delivery(id).await? else {
                return Ok(None);
            };
            let out = f(&mut d);
            match self
                .deliveries
                .update(id.to_string(), encode(&d), revision)
                .await
            {
                Ok(_) => return Ok(Some((d, out))),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(cluster(e)),
            }
        }
    }

    /// Creates the delivery `id` unless it exists (a dispatch run again
    /// after a crash), then publishes its job (de-duplicated by the jobs
    /// stream on its id and generation).
    pub(super) async fn create_delivery(
        &self,
        id: DeliveryId,
        rec: DeliRec,
    ) -> Result<(), StorageError> {
        let d = StoredDelivery {
            rec,
            log: Vec::new(),
            generation: 0,
        };
        let generation = match self.deliveries.create(id.to_string(), encode(&d)).await {
            Ok(_) => 0,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match self.delivery(id).await? {
                    Some((existing, _)) => existing.generation,
                    None => 0,
                }
            }
            Err(e) => return Err(cluster(e)),
        };
        self.publish_job(id, WebhookId::from_bytes(d.rec.webhook), generation)
            .await
    }

    /// Publishes the job of `id`'s generation `generation`.
    pub(super) async fn publish_job(
        &self,
        id: DeliveryId,
        hook: WebhookId,
        generation: u32,
    ) -> Result<(), StorageError> {
        let job = format!("{id}:{generation}");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", job.as_str());
        self.js
            .publish_with_headers(
                format!("{}.{hook}", self.jobs_name),
                headers,
                Bytes::from(job.clone()),
            )
            .await
            .map_err(cluster)?
            .await
            .map_err(cluster)?;
        Ok(())
    }

    /// Fails every pending delivery of `hook` with `reason` (it was
    /// disabled or deleted); their jobs are dropped when they come.
    pub(super) async fn fail_pending(
        &self,
        hook: WebhookId,
        reason: &str,
    ) -> Result<(), StorageError> {
        let target = hook.to_bytes();
        for (key, value) in self.all(&self.deliveries).await? {
            let d: StoredDelivery = decode(&value, "deliveries", &key)?;
            if d.rec.webhook != target || d.rec.status != DeliveryStatus::Pending {
                continue;
            }
            let id = DeliveryId::parse(&key).map_err(|e| corrupted("deliveries", &key, e))?;
            self.fail_delivery(id, reason).await?;
        }
        Ok(())
    }

    /// Fails the delivery `id` with `reason` if it is pending.
    pub(super) async fn fail_delivery(
        &self,
        id: DeliveryId,
        reason: &str,
    ) -> Result<(), StorageError> {
        let now = now_ns();
        self.modify_delivery(id, |d| {
            if d.rec.status == DeliveryStatus::Pending {
                d.rec.status = DeliveryStatus::Failed;
                d.rec.next_retry_ns = None;
                reason.clone_into(&mut d.rec.error);
                d.rec.updated_ns = now;
            }
        })
        .await
        .map(drop)
    }
}

async fn kv_bucket(
    js: &jetstream::Context,
    bucket: String,
    replicas: usize,
) -> Result<kv::Store, StorageError> {
    if let Ok(store) = js.get_key_value(&bucket).await {
        return Ok(store);
    }
    match js
        .create_key_value(kv::Config {
            bucket: bucket.clone(),
            history: 1,
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
    {
        Ok(store) => Ok(store),
        // Another process created it meanwhile.
        Err(e) => js.get_key_value(&bucket).await.map_err(|_| cluster(e)),
    }
}

fn decode_hook(key: &str, value: &[u8]) -> Result<(WebhookId, StoredHook), StorageError> {
    let id = WebhookId::parse(key).map_err(|e| corrupted("webhooks", key, e))?;
    Ok((id, decode(value, "webhooks", key)?))
}

pub(super) fn encode<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    table: &'static str,
    key: &str,
) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| corrupted(table, key, e))
}

fn corrupted(table: &'static str, key: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupted {
        table,
        key: key.to_owned(),
        reason: e.to_string(),
    }
}

/// The delivery id of the event at `seq` to `hook`: the same every time it
/// is computed, so a dispatch run again after a crash finds the delivery
/// it made. It sorts by the event's append time (`at_ms`), as ids do.
pub(super) fn delivery_id(hook: WebhookId, seq: u64, at_ms: u64) -> DeliveryId {
    let mut digest = sha2::Sha256::new();
    digest.update(hook.to_bytes());
    digest.update(seq.to_be_bytes());
    let digest = digest.finalize();
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&at_ms.to_be_bytes()[2..]);
    bytes[6..].copy_from_slice(&digest[..10]);
    DeliveryId::from_bytes(bytes)
}

/// The webhook registry of a [`JetStreamBus`], with the same records,
/// checks and errors as [`Webhooks`](crate::Webhooks) on a file. Get one
/// with [`JetStreamBus::webhooks`].
///
/// A change is stored on a quorum of the cluster when a method returns
/// `Ok`. Disabling or deleting a webhook fails its pending deliveries.
#[derive(Clone)]
pub struct JetStreamWebhooks {
    bus: JetStreamBus,
    policy: UrlPolicy,
    grace: Duration,
}

impl std::fmt::Debug for JetStreamWebhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamWebhooks")
            .field("stream", &self.bus.inner.stream)
            .field("allow_private_targets", &self.policy.allow_private)
            .field("rotation_grace", &self.grace)
            .finish()
    }
}

impl JetStreamBus {
    /// The webhook registry of this log. Private targets (loopback,
    /// private networks, …) are refused unless
    /// [`JetStreamWebhooks::allow_private_targets`] is set.
    pub fn webhooks(&self) -> JetStreamWebhooks {
        JetStreamWebhooks {
            bus: self.clone(),
            policy: UrlPolicy::default(),
            grace: DEFAULT_ROTATION_GRACE,
        }
    }

    /// The webhook stores, opened once per bus.
    pub(super) fn stores(&self) -> Result<Stores, StorageError> {
        if let Some(s) = self.inner.webhook_stores.get() {
            return Ok(s.clone());
        }
        let stores = self.inner.block_on(self.retrying(|| Stores::open(self)))?;
        Ok(self.inner.webhook_stores.get_or_init(|| stores).clone())
    }
}

impl JetStreamWebhooks {
    /// Allows targets on loopback, private, link-local and other reserved
    /// addresses (default off; for development and tests).
    #[must_use]
    pub fn allow_private_targets(mut self, allow: bool) -> Self {
        self.policy.allow_private = allow;
        self
    }

    /// How long the previous secret keeps signing after
    /// [`JetStreamWebhooks::rotate_secret`] (default 24 h).
    #[must_use]
    pub fn rotation_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    fn check_url(&self, url: &str) -> Result<(), WebhookError> {
        let target = validate_url(url)?;
        self.policy.check(&target)?;
        Ok(())
    }

    fn open(&self) -> Result<Stores, WebhookError> {
        if self
            .bus
            .inner
            .closed
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(WebhookError::Closed);
        }
        Ok(self.bus.stores()?)
    }

    fn block_on<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        self.bus.inner.block_on(f)
    }

    /// Registers a webhook; every event of its tenant appended after this
    /// returns and matching a pattern gets a delivery. The secret is
    /// returned here only (and by [`JetStreamWebhooks::rotate_secret`]).
    ///
    /// # Errors
    /// [`WebhookError::InvalidTenant`], [`WebhookError::Url`],
    /// [`WebhookError::Secret`], [`WebhookError::Pattern`]: nothing stored.
    /// [`WebhookError::Storage`], [`WebhookError::Closed`].
    pub fn create(&self, new: NewWebhook) -> Result<CreatedWebhook, WebhookError> {
        check_tenant(&new.tenant_id)?;
        self.check_url(&new.url)?;
        let events = parse_patterns(&new.events)?;
        let secret = match &new.secret {
            Some(s) => Secret::parse(s)?,
            None => Secret::generate(),
        };
        let stores = self.open()?;
        let id = WebhookId::new();
        let now = now_ns();
        let mut hook = StoredHook {
            rec: HookRec {
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
            },
            from_seq: None,
        };
        let key = id.to_string();
        let revision = self
            .block_on(stores.hooks.create(key.clone(), encode(&hook)))
            .map_err(cluster)?;
        // Provisional until here: the log's end, read after it was stored.
        let last = self.bus.last_seq()?;
        self.bus.ensure_dispatch(last + 1)?;
        hook.from_seq = Some(last);
        self.block_on(stores.hooks.update(key, encode(&hook), revision))
            .map_err(cluster)?;
        Ok(CreatedWebhook {
            webhook: to_webhook(id.to_bytes(), &hook.rec),
            secret,
        })
    }

    /// One webhook.
    ///
    /// # Errors
    /// [`WebhookError::UnknownWebhook`], [`WebhookError::Storage`].
    pub fn get(&self, id: WebhookId) -> Result<Webhook, WebhookError> {
        let stores = self.open()?;
        match self.block_on(stores.hook(id))? {
            Some((h, _)) => Ok(to_webhook(id.to_bytes(), &h.rec)),
            None => Err(WebhookError::UnknownWebhook(id)),
        }
    }

    /// Every webhook, or those of one tenant, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when the cluster fails or a record is corrupted.
    pub fn list(&self, tenant: Option<&str>) -> Result<Vec<Webhook>, StorageError> {
        let stores = self.bus.stores()?;
        Ok(self
            .block_on(stores.hooks())?
            .into_iter()
            .filter(|(_, h)| tenant.is_none_or(|t| h.rec.tenant_id == t))
            .map(|(id, h)| to_webhook(id.to_bytes(), &h.rec))
            .collect())
    }

    fn modify(
        &self,
        id: WebhookId,
        f: impl FnMut(&mut StoredHook) -> Result<Option<String>, WebhookError> + Send,
    ) -> Result<HookRec, WebhookError> {
        let stores = self.open()?;
        let mut f = f;
        let (hook, fail) = self
            .block_on(stores.modify_hook(id, |h| {
                let fail = f(h)?;
                h.rec.updated_ns = now_ns();
                Ok(fail)
            }))?
            .ok_or(WebhookError::UnknownWebhook(id))?;
        if let Some(reason) = fail {
            self.block_on(stores.fail_pending(id, &reason))?;
        }
        Ok(hook.rec)
    }

    /// Changes a webhook's URL, patterns or state, as
    /// [`Webhooks::update`](crate::Webhooks::update): disabling fails its
    /// pending deliveries; enabling clears the reason and the failure
    /// clock.
    ///
    /// # Errors
    /// [`WebhookError::UnknownWebhook`], [`WebhookError::Url`],
    /// [`WebhookError::Pattern`]: nothing stored. [`WebhookError::Storage`].
    pub fn update(&self, id: WebhookId, update: WebhookUpdate) -> Result<Webhook, WebhookError> {
        if let Some(url) = &update.url {
            self.check_url(url)?;
        }
        let events = update.events.as_deref().map(parse_patterns).transpose()?;
        let rec = self.modify(id, |h| {
            let disabled =
                h.rec
                    .apply_update(update.url.as_deref(), events.as_deref(), update.active);
            Ok(disabled.map(str::to_owned))
        })?;
        Ok(to_webhook(id.to_bytes(), &rec))
    }

    /// Enables a webhook.
    ///
    /// # Errors
    /// As [`JetStreamWebhooks::update`].
    pub fn enable(&self, id: WebhookId) -> Result<Webhook, WebhookError> {
        self.update(id, WebhookUpdate::state(true))
    }

    /// Disables a webhook: no new deliveries, its pending ones fail.
    ///
    /// # Errors
    /// As [`JetStreamWebhooks::update`].
    pub fn disable(&self, id: WebhookId) -> Result<Webhook, WebhookError> {
        self.update(id, WebhookUpdate::state(false))
    }

    /// Deletes a webhook; its pending deliveries fail ("webhook deleted"),
    /// the records stay for audit.
    ///
    /// # Errors
    /// [`WebhookError::UnknownWebhook`], [`WebhookError::Storage`].
    pub fn delete(&self, id: WebhookId) -> Result<(), WebhookError> {
        let stores = self.open()?;
        if self.block_on(stores.hook(id))?.is_none() {
            return Err(WebhookError::UnknownWebhook(id));
        }
        self.block_on(stores.hooks.delete(id.to_string()))
            .map_err(cluster)?;
        self.block_on(stores.fail_pending(id, "webhook deleted"))?;
        Ok(())
    }

    /// Replaces a webhook's secret; the previous one keeps signing beside
    /// it for the rotation grace period.
    ///
    /// # Errors
    /// [`WebhookError::Secret`], [`WebhookError::UnknownWebhook`]: nothing
    /// stored. [`WebhookError::Storage`].
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
        let rec = self.modify(id, |h| {
            let old = std::mem::replace(&mut h.rec.secret, secret.expose().to_owned());
            h.rec.prev_secret = Some((old, now_ns().saturating_add(grace)));
            Ok(None)
        })?;
        Ok(CreatedWebhook {
            webhook: to_webhook(id.to_bytes(), &rec),
            secret,
        })
    }

    /// Deliveries, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when the cluster fails or a record is corrupted.
    pub fn deliveries(&self, q: &DeliveryQuery) -> Result<Vec<WebhookDelivery>, StorageError> {
        let stores = self.bus.stores()?;
        let mut out = Vec::new();
        for (key, value) in self.block_on(stores.all(&stores.deliveries))? {
            let id = DeliveryId::parse(&key).map_err(|e| corrupted("deliveries", &key, e))?;
            let d: StoredDelivery = decode(&value, "deliveries", &key)?;
            let wanted = q.webhook_id.is_none_or(|w| w.to_bytes() == d.rec.webhook)
                && q.status.is_none_or(|s| s == d.rec.status);
            if wanted {
                out.push(to_delivery(id.to_bytes(), &d.rec));
            }
        }
        out.sort_by_key(|d| (d.created_at, d.seq, d.id));
        if let Some(n) = q.limit {
            out.truncate(n);
        }
        Ok(out)
    }

    fn stored_delivery(&self, id: DeliveryId) -> Result<StoredDelivery, WebhookError> {
        let stores = self.open()?;
        match self.block_on(stores.delivery(id))? {
            Some((d, _)) => Ok(d),
            None => Err(WebhookError::UnknownDelivery(id)),
        }
    }

    /// One delivery.
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::Storage`].
    pub fn delivery(&self, id: DeliveryId) -> Result<WebhookDelivery, WebhookError> {
        Ok(to_delivery(id.to_bytes(), &self.stored_delivery(id)?.rec))
    }

    /// The attempt log of one delivery, first attempt first.
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::Storage`].
    pub fn attempts(&self, id: DeliveryId) -> Result<Vec<DeliveryAttempt>, WebhookError> {
        Ok(self
            .stored_delivery(id)?
            .log
            .into_iter()
            .zip(1..)
            .map(|(a, n)| DeliveryAttempt {
                attempt: n,
                at: ts(a.at_ns),
                status_code: a.status_code,
                duration_ms: a.duration_us / 1000,
                error: a.error,
                response: a.response,
            })
            .collect())
    }

    /// Makes a delivery due now, as
    /// [`Webhooks::retry`](crate::Webhooks::retry): a new job replaces the
    /// one waiting, if any.
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::UnknownWebhook`]
    /// (deleted), [`WebhookError::Inactive`]: nothing stored.
    /// [`WebhookError::Storage`].
    pub fn retry(&self, id: DeliveryId) -> Result<WebhookDelivery, WebhookError> {
        let stores = self.open()?;
        let d = self.stored_delivery(id)?;
        let hook = WebhookId::from_bytes(d.rec.webhook);
        match self.block_on(stores.hook(hook))? {
            None => return Err(WebhookError::UnknownWebhook(hook)),
            Some((h, _)) if !h.rec.active => return Err(WebhookError::Inactive(hook)),
            Some(_) => {}
        }
        let now = now_ns();
        let (d, generation) = self
            .block_on(stores.modify_delivery(id, |d| {
                d.rec.status = DeliveryStatus::Pending;
                d.rec.next_retry_ns = Some(now);
                d.rec.updated_ns = now;
                d.generation += 1;
                d.generation
            }))?
            .ok_or(WebhookError::UnknownDelivery(id))?;
        self.block_on(stores.publish_job(id, hook, generation))?;
        Ok(to_delivery(id.to_bytes(), &d.rec))
    }

    /// Creates a new delivery for every event of the webhook's tenant that
    /// matches its patterns and was appended at or after `since` (and not
    /// after `until`), as [`Webhooks::replay`](crate::Webhooks::replay).
    ///
    /// # Errors
    /// [`WebhookError::InvalidWindow`], [`WebhookError::UnknownWebhook`],
    /// [`WebhookError::Inactive`], [`WebhookError::Unsound`]: nothing
    /// stored. [`WebhookError::Storage`].
    pub fn replay(
        &self,
        id: WebhookId,
        since: Timestamp,
        until: Option<Timestamp>,
    ) -> Result<Vec<DeliveryId>, WebhookError> {
        if until.is_some_and(|u| u < since) {
            return Err(WebhookError::InvalidWindow);
        }
        let stores = self.open()?;
        let hook = match self.block_on(stores.hook(id))? {
            None => return Err(WebhookError::UnknownWebhook(id)),
            Some((h, _)) if !h.rec.active => return Err(WebhookError::Inactive(id)),
            Some((h, _)) => h.rec,
        };
        if let Some(reason) = hook.unsound(now_ns()) {
            return Err(WebhookError::Unsound { id, reason });
        }
        let filter = Filter {
            types: hook.patterns().unwrap_or_default(),
            tenant_id: Some(hook.tenant_id.clone()),
            instance_id: None,
        };
        let reader =
            self.bus
                .read(Position::Time(since), &filter)
                .map_err(|e| StorageError::Cluster {
                    reason: e.to_string(),
                })?;
        let mut ids = Vec::new();
        let now = now_ns();
        for entry in reader {
            let entry = entry.map_err(|e| StorageError::Cluster {
                reason: e.to_string(),
            })?;
            if until.is_some_and(|u| entry.appended_at > u) {
                break;
            }
            let delivery = DeliveryId::new();
            let rec = new_delivery(id, entry.event.id, entry.seq, now);
            self.block_on(stores.create_delivery(delivery, rec))?;
            ids.push(delivery);
        }
        Ok(ids)
    }
}

/// A pending delivery's first record.
pub(super) fn new_delivery(hook: WebhookId, event: EventId, seq: u64, created_ns: i64) -> DeliRec {
    DeliRec {
        created_ns,
        updated_ns: created_ns,
        webhook: hook.to_bytes(),
        event: event.to_bytes(),
        seq,
        status: DeliveryStatus::Pending,
        status_code: 0,
        attempts: 0,
        next_retry_ns: Some(created_ns),
        error: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_the_same_for_the_same_event_and_hook_and_sort_by_time() {
        let (a, b) = (WebhookId::new(), WebhookId::new());
        assert_eq!(delivery_id(a, 7, 1000), delivery_id(a, 7, 1000));
        assert_ne!(delivery_id(a, 7, 1000), delivery_id(a, 8, 1000));
        assert_ne!(delivery_id(a, 7, 1000), delivery_id(b, 7, 1000));
        assert!(delivery_id(b, 9, 1000) < delivery_id(a, 1, 1001));
        assert_eq!(
            delivery_id(a, 1, 1_700_000_000_123).ulid().timestamp_ms(),
            1_700_000_000_123
        );
    }

    #[test]
    fn stored_records_never_show_the_secret_but_keep_it() {
        let hook = StoredHook {
            rec: HookRec {
                created_ns: 1,
                updated_ns: 2,
                tenant_id: "acme".into(),
                url: "https://x.example/h".into(),
                events: vec!["deploy.*".into()],
                active: true,
                disabled_reason: None,
                secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
                prev_secret: None,
                failing_since_ns: None,
            },
            from_seq: Some(3),
        };
        let back: StoredHook = decode(&encode(&hook), "webhooks", "k").unwrap();
        assert_eq!(back.rec.secret, hook.rec.secret);
        assert_eq!(back.from_seq, Some(3));
        let shown = serde_json::to_string(&to_webhook([1; 16], &back.rec)).unwrap();
        assert!(!shown.contains("whsec_"), "{shown}");
        assert!(matches!(
            decode::<StoredHook>(b"{\"nope\":1}", "webhooks", "k"),
            Err(StorageError::Corrupted { .. })
        ));
    }
}
