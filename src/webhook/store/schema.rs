//! The registry's tables and stored records (`HookRec`, `DeliRec`,
//! `AttemptRec`): what is on disk, how it decodes, and what `check` says of it.

use super::*;

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

    /// Applies a change of URL, (parsed) patterns or state. Enabling clears
    /// the disabled reason and the failure clock; disabling records "disabled
    /// by an operator" and returns the reason its pending deliveries fail
    /// with (both registries fail them).
    pub(crate) fn apply_update(
        &mut self,
        url: Option<&str>,
        events: Option<&[String]>,
        active: Option<bool>,
    ) -> Option<&'static str> {
        if let Some(url) = url {
            url.clone_into(&mut self.url);
        }
        if let Some(events) = events {
            self.events = events.to_vec();
        }
        match active {
            Some(true) if !self.active => {
                self.active = true;
                self.disabled_reason = None;
                self.failing_since_ns = None;
                None
            }
            Some(false) if self.active => {
                self.active = false;
                self.disabled_reason = Some("disabled by an operator".into());
                Some("webhook disabled: disabled by an operator")
            }
            _ => None,
        }
    }

    /// Why this webhook can't be delivered to as stored, if it can't: its
    /// deliveries fail with this reason and `check` reports it.
    pub(crate) fn unsound(&self, now_ns: i64) -> Option<String> {
        self.patterns()
            .err()
            .or_else(|| self.signing_secrets(now_ns).err())
            .or_else(|| {
                crate::webhook::url_policy::validate_url(&self.url)
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
