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

pub(crate) const WEBHOOKS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("webhooks");
pub(crate) const HOOK_META: TableDefinition<&str, u64> = TableDefinition::new("webhook_meta");
pub(crate) const DELIVERIES: TableDefinition<[u8; 16], &[u8]> =
    TableDefinition::new("webhook_deliveries");
pub(crate) const DUE: TableDefinition<(i64, [u8; 16]), ()> = TableDefinition::new("webhook_due");
pub(crate) const BY_HOOK: TableDefinition<([u8; 16], [u8; 16]), ()> =
    TableDefinition::new("webhook_deliveries_by_hook");
pub(crate) const ATTEMPTS: TableDefinition<([u8; 16], u32), &[u8]> =
    TableDefinition::new("webhook_attempts");

pub(crate) const META_VERSION: &str = "version";

/// Default time the previous secret keeps signing after a rotation.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Longest tenant id accepted for a webhook, in bytes.
const MAX_TENANT_LEN: usize = 256;

/// A stored webhook. The secret is stored (it must sign) but never leaves
/// this module except to the sender.
#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct HookRec {
    pub(crate) created_ns: i64,
    pub(crate) updated_ns: i64,
    pub(crate) tenant_id: String,
    pub(crate) url: String,
    pub(crate) events: Vec<String>,
    pub(crate) active: bool,
    pub(crate) disabled_reason: Option<String>,
    pub(crate) secret: String,
    /// The secret before the last rotation, and until when it still signs.
    pub(crate) prev_secret: Option<(String, i64)>,
    /// First failed attempt since the last success (or since creation).
    pub(crate) failing_since_ns: Option<i64>,
}

impl HookRec {
    /// The stored patterns, parsed. A pattern that no longer parses (a
    /// damaged record) is an error naming it: matching "every type" in its
    /// place would send a tenant's events the webhook never asked for.
    pub(crate) fn patterns(&self) -> Result<Vec<Pattern>, String> {
        self.events
            .iter()
            .map(|p| {
                Pattern::new(p.as_str())
                    .map_err(|e| format!("its stored event pattern {p:?} is unreadable: {e}"))
            })
            .collect()
    }

    /// The secrets that sign at `now_ns`: the current one, then the previous
    /// one while its grace period lasts. A stored secret that no longer
    /// parses is an error: sending without a signature would fail open.
    pub(crate) fn signing_secrets(&self, now_ns: i64) -> Result<Vec<Secret>, String> {
        let unreadable = |which: &str| format!("its stored {which} secret is unreadable");
        let mut out = Vec::with_capacity(2);
        out.push(Secret::parse(&self.secret).map_err(|_| unreadable("signing"))?);
        if let Some((prev, until)) = &self.prev_secret
            && *until > now_ns
        {
            out.push(Secret::parse(prev).map_err(|_| unreadable("previous"))?);
        }
        Ok(out)
    }

    /// Why this webhook can't be delivered to as stored, if it can't: its
    /// deliveries fail with this reason and `check` reports it.
    pub(crate) fn unsound(&self, now_ns: i64) -> Option<String> {
        self.patterns()
            .err()
            .or_else(|| self.signing_secrets(now_ns).err())
            .or_else(|| {
                super::url_policy::validate_url(&self.url)
                    .err()
                    .map(|e| format!("its stored URL is invalid: {e}"))
            })
    }
}

/// Problems of the stored webhooks, for `check`: records that don't decode
/// and webhooks that can't be delivered to as stored.
pub(crate) fn check_registry(
    txn: &redb::ReadTransaction,
    problems: &mut Vec<String>,
) -> Result<(), StorageError> {
    let table = match txn.open_table(WEBHOOKS) {
        Ok(t) => t,
        Err(e) if missing(&e) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let now = now_ns();
    for row in table.iter()? {
        let (k, v) = row?;
        let id = k.value();
        match decode_hook(v.value(), &id) {
            Err(e) => problems.push(format!("webhook {}: {e}", hook_key(&id))),
            Ok(rec) => {
                if let Some(reason) = rec.unsound(now) {
                    problems.push(format!(
                        "webhook {}: {reason}; its deliveries fail until it is fixed",
                        hook_key(&id)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A stored delivery.
#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct DeliRec {
    pub(crate) created_ns: i64,
    pub(crate) updated_ns: i64,
    pub(crate) webhook: [u8; 16],
    pub(crate) event: [u8; 16],
    pub(crate) seq: u64,
    /// Stored as its variant index (0, 1, 2: the bytes the `u8` it replaced
    /// had); any other byte fails to decode, as a corrupted record.
    pub(crate) status: DeliveryStatus,
    pub(crate) status_code: u16,
    pub(crate) attempts: u32,
    pub(crate) next_retry_ns: Option<i64>,
    pub(crate) error: String,
}

/// One stored attempt.
#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct AttemptRec {
    pub(crate) at_ns: i64,
    pub(crate) duration_us: u64,
    pub(crate) status_code: u16,
    pub(crate) error: String,
    pub(crate) response: String,
}

pub(crate) use crate::time::{now_ns, ts};

/// A registered webhook, as shown to users. The secret is deliberately not
/// here: it is shown once, in [`CreatedWebhook`], and never serialized.
///
/// JSON (names of the Go original): `{"id","created_at","updated_at",
/// "tenant_id","url","events","active"}` plus `"disabled_reason"` when set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Webhook {
    /// Its id, `hook_…`.
    pub id: WebhookId,
    /// When it was registered.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// The only tenant whose events it receives.
    pub tenant_id: String,
    /// Where deliveries are POSTed.
    pub url: String,
    /// Event type patterns; empty means every type.
    pub events: Vec<Pattern>,
    /// Whether new events create deliveries for it and its deliveries are
    /// attempted.
    pub active: bool,
    /// Why it was disabled (by an operator, a 410 Gone, or failing too
    /// long), when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
}

/// A webhook just created, or whose secret was just rotated, with its
/// secret: the only time the secret is handed out. `Debug` hides the secret;
/// [`Secret::expose`] shows it.
#[derive(Debug, Clone)]
pub struct CreatedWebhook {
    /// The webhook.
    pub webhook: Webhook,
    /// Its (new) signing secret.
    pub secret: Secret,
}

/// What [`Webhooks::create`] registers.
#[derive(Clone, Default)]
pub struct NewWebhook {
    /// The tenant whose events it receives (required, 1–256 bytes).
    pub tenant_id: String,
    /// An `http` or `https` URL.
    pub url: String,
    /// Event type patterns (`deploy.failed`, `deploy.*`, `*`); empty means
    /// every type.
    pub events: Vec<String>,
    /// A `whsec_…` secret; `None` generates one.
    pub secret: Option<String>,
}

impl std::fmt::Debug for NewWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewWebhook")
            .field("tenant_id", &self.tenant_id)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &self.secret.as_ref().map(|_| "****"))
            .finish()
    }
}

/// Changes for [`Webhooks::update`]; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct WebhookUpdate {
    /// A new URL.
    pub url: Option<String>,
    /// New event patterns (empty: every type).
    pub events: Option<Vec<String>>,
    /// Enable or disable.
    pub active: Option<bool>,
}

/// The state of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Waiting for its first or next attempt.
    Pending,
    /// An attempt got a 2xx answer.
    Succeeded,
    /// Every attempt failed, or its webhook was disabled or deleted.
    Failed,
}

impl DeliveryStatus {
    /// `"pending"`, `"succeeded"` or `"failed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
        }
    }
}

impl std::str::FromStr for DeliveryStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pending" => Ok(DeliveryStatus::Pending),
            "succeeded" => Ok(DeliveryStatus::Succeeded),
            "failed" => Ok(DeliveryStatus::Failed),
            other => Err(format!(
                "unknown delivery status {other:?} (pending, succeeded or failed)"
            )),
        }
    }
}

/// One event's delivery to one webhook.
///
/// JSON (names of the Go original): `id`, `created_at`, `updated_at`,
/// `webhook_id`, `event_id`, `seq`, `status`, `status_code` (of the last
/// attempt; 0 before any answer), `attempts`, `next_retry` (omitted when
/// none), `error` (omitted when empty).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookDelivery {
    /// Its id, `deli_…`.
    pub id: DeliveryId,
    /// When it was created (the event's append time, for dispatch).
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// The webhook.
    pub webhook_id: WebhookId,
    /// The event (also the `webhook-id` header of every attempt).
    pub event_id: EventId,
    /// The event's `seq` in the log.
    pub seq: u64,
    /// Pending, succeeded or failed.
    pub status: DeliveryStatus,
    /// HTTP status of the last attempt that got an answer (0 if none).
    pub status_code: u16,
    /// Attempts made.
    pub attempts: u32,
    /// When the next attempt is due, while pending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<Timestamp>,
    /// What went wrong last, if anything.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryAttempt {
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When it started.
    pub at: Timestamp,
    /// HTTP status, 0 when there was no answer (timeout, connection error,
    /// refused target).
    pub status_code: u16,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// What went wrong, if anything.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The first 1 KiB of the response body (lossy UTF-8).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub response: String,
}

/// Which deliveries to list.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    /// Only this webhook's.
    pub webhook_id: Option<WebhookId>,
    /// Only those in this state.
    pub status: Option<DeliveryStatus>,
    /// At most this many (oldest first).
    pub limit: Option<usize>,
}

fn to_webhook(id: [u8; 16], r: &HookRec) -> Webhook {
    Webhook {
        id: WebhookId::from_bytes(id),
        created_at: ts(r.created_ns),
        updated_at: ts(r.updated_ns),
        tenant_id: r.tenant_id.clone(),
        url: r.url.clone(),
        // What still parses: an unreadable pattern is reported by `check`
        // and fails the webhook's deliveries, never widens its match.
        events: r
            .events
            .iter()
            .filter_map(|p| Pattern::new(p.as_str()).ok())
            .collect(),
        active: r.active,
        disabled_reason: r.disabled_reason.clone(),
    }
}

fn to_delivery(id: [u8; 16], r: &DeliRec) -> WebhookDelivery {
    WebhookDelivery {
        id: DeliveryId::from_bytes(id),
        created_at: ts(r.created_ns),
        updated_at: ts(r.updated_ns),
        webhook_id: WebhookId::from_bytes(r.webhook),
        event_id: EventId::from_bytes(r.event),
        seq: r.seq,
        status: r.status,
        status_code: r.status_code,
        attempts: r.attempts,
        next_retry: r.next_retry_ns.map(ts),
        error: r.error.clone(),
    }
}

pub(crate) fn hook_key(id: &[u8; 16]) -> String {
    WebhookId::from_bytes(*id).to_string()
}

pub(crate) fn deli_key(id: &[u8; 16]) -> String {
    DeliveryId::from_bytes(*id).to_string()
}

pub(crate) fn decode_hook(bytes: &[u8], id: &[u8; 16]) -> Result<HookRec, StorageError> {
    decode_record(bytes, "webhooks", hook_key(id))
}

pub(crate) fn decode_deli(bytes: &[u8], id: &[u8; 16]) -> Result<DeliRec, StorageError> {
    decode_record(bytes, "webhook_deliveries", deli_key(id))
}

// ---- read-only listings (shared by the bus handle and `ReadOnlyLog`) ----

/// A read transaction, or `None` when the file has no webhook tables yet
/// (a log created by an older build, read from another process).
fn read_txn<D: ReadableDatabase>(db: &D) -> Result<redb::ReadTransaction, StorageError> {
    Ok(db.begin_read()?)
}

fn missing(e: &redb::TableError) -> bool {
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

// ---- writes ----

pub(crate) fn write_txn(shared: &Shared) -> Result<redb::WriteTransaction, StorageError> {
    crate::durable::txn::write(shared)
}

/// Bumps the registry version (the dispatcher reloads its cache).
pub(crate) fn bump_version(txn: &redb::WriteTransaction) -> Result<(), StorageError> {
    let mut meta = txn.open_table(HOOK_META)?;
    let v = meta.get(META_VERSION)?.map(|g| g.value()).unwrap_or(0);
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
        rec.error = reason.to_owned();
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

impl DurableBus {
    /// The webhook registry of this bus. Private targets (loopback, private
    /// networks, …) are refused unless
    /// [`Webhooks::allow_private_targets`] is set.
    pub fn webhooks(&self) -> Webhooks {
        Webhooks {
            bus: self.clone(),
            shared: self.shared().clone(),
            policy: UrlPolicy::default(),
            grace: DEFAULT_ROTATION_GRACE,
        }
    }
}

impl ReadOnlyLog {
    /// Every webhook, or those of one tenant, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails or a record is corrupted.
    pub fn webhooks(&self, tenant: Option<&str>) -> Result<Vec<Webhook>, StorageError> {
        list_webhooks(self.database(), tenant)
    }

    /// One webhook.
    ///
    /// # Errors
    /// [`WebhookError::UnknownWebhook`], [`WebhookError::Storage`].
    pub fn webhook(&self, id: WebhookId) -> Result<Webhook, WebhookError> {
        get_webhook(self.database(), id)
    }

    /// Deliveries, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when storage fails or a record is corrupted.
    pub fn webhook_deliveries(
        &self,
        q: &DeliveryQuery,
    ) -> Result<Vec<WebhookDelivery>, StorageError> {
        list_deliveries(self.database(), q)
    }

    /// One delivery.
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::Storage`].
    pub fn webhook_delivery(&self, id: DeliveryId) -> Result<WebhookDelivery, WebhookError> {
        get_delivery(self.database(), id)
    }

    /// The attempt log of one delivery, first attempt first.
    ///
    /// # Errors
    /// [`WebhookError::UnknownDelivery`], [`WebhookError::Storage`].
    pub fn webhook_attempts(&self, id: DeliveryId) -> Result<Vec<DeliveryAttempt>, WebhookError> {
        list_attempts(self.database(), id)
    }
}

fn check_tenant(t: &str) -> Result<(), WebhookError> {
    if t.is_empty() || t.len() > MAX_TENANT_LEN || t.chars().any(char::is_control) {
        return Err(WebhookError::InvalidTenant(t.to_owned()));
    }
    Ok(())
}

fn parse_patterns(events: &[String]) -> Result<Vec<String>, WebhookError> {
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
        super::dispatch::wake(&self.shared);
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
            if let Some(url) = update.url {
                rec.url = url;
            }
            if let Some(events) = events {
                rec.events = events;
            }
            match update.active {
                Some(true) if !rec.active => {
                    rec.active = true;
                    rec.disabled_reason = None;
                    rec.failing_since_ns = None;
                }
                Some(false) if rec.active => {
                    rec.active = false;
                    rec.disabled_reason = Some("disabled by an operator".into());
                    fail_pending(
                        txn,
                        &id.to_bytes(),
                        "webhook disabled: disabled by an operator",
                        now,
                    )?;
                }
                _ => {}
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
        self.update(
            id,
            WebhookUpdate {
                active: Some(true),
                ..Default::default()
            },
        )
    }

    /// Disables a webhook: no new deliveries, its pending ones fail.
    ///
    /// # Errors
    /// As [`Webhooks::update`].
    pub fn disable(&self, id: WebhookId) -> Result<Webhook, WebhookError> {
        self.update(
            id,
            WebhookUpdate {
                active: Some(false),
                ..Default::default()
            },
        )
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
            if let Some(at) = rec.next_retry_ns {
                due.remove((at, key)).map_err(StorageError::from)?;
            }
            if rec.status != DeliveryStatus::Pending {
                rec.status = DeliveryStatus::Pending;
                rec.error = String::new();
            }
            rec.next_retry_ns = Some(now);
            rec.updated_ns = now;
            due.insert((now, key), ()).map_err(StorageError::from)?;
            deliveries
                .insert(key, encode_record(&rec).as_slice())
                .map_err(StorageError::from)?;
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
        let (txn, found) = loop {
            let hook = read_hook()?;
            let found = scan(&hook)?;
            // 2. Create the deliveries in one write transaction, with the
            // webhook checked again: if it changed meanwhile, scan again.
            let txn = self.open()?;
            let now_hook = check(load_hook(&txn, &key)?)?;
            if now_hook.tenant_id == hook.tenant_id && now_hook.events == hook.events {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `DeliRec` as files before the status enum stored it.
    #[derive(Serialize)]
    struct DeliRecV1 {
        created_ns: i64,
        updated_ns: i64,
        webhook: [u8; 16],
        event: [u8; 16],
        seq: u64,
        status: u8,
        status_code: u16,
        attempts: u32,
        next_retry_ns: Option<i64>,
        error: String,
    }

    fn v1(status: u8) -> Vec<u8> {
        encode_record(&DeliRecV1 {
            created_ns: 1,
            updated_ns: 2,
            webhook: [3; 16],
            event: [4; 16],
            seq: 5,
            status,
            status_code: 200,
            attempts: 1,
            next_retry_ns: None,
            error: String::new(),
        })
    }

    #[test]
    fn stored_statuses_read_back_and_an_unknown_one_is_corruption() {
        for (byte, status) in [
            (0, DeliveryStatus::Pending),
            (1, DeliveryStatus::Succeeded),
            (2, DeliveryStatus::Failed),
        ] {
            let rec = decode_deli(&v1(byte), &[9; 16]).unwrap();
            assert_eq!(rec.status, status);
            assert_eq!(rec.seq, 5);
            assert_eq!(encode_record(&rec), v1(byte), "the same bytes as before");
        }
        assert!(matches!(
            decode_deli(&v1(3), &[9; 16]),
            Err(StorageError::Corrupted { .. })
        ));
    }
}
