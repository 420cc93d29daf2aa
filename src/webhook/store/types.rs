//! The public records of the registry: [`Webhook`], [`WebhookDelivery`],
//! [`DeliveryAttempt`] and what is given to create, update and query them.

use super::*;

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
    /// Where deliveries are `POSTed`.
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

impl WebhookUpdate {
    /// Only enabling (`true`) or disabling (`false`).
    pub(crate) fn state(active: bool) -> WebhookUpdate {
        WebhookUpdate {
            active: Some(active),
            ..WebhookUpdate::default()
        }
    }
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

pub(crate) fn to_webhook(id: [u8; 16], r: &HookRec) -> Webhook {
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

pub(crate) fn to_delivery(id: [u8; 16], r: &DeliRec) -> WebhookDelivery {
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
