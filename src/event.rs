//! The event envelope, its type, and its JSON.
//!
//! The JSON is the contract webhook receivers and other programs rely on (a
//! webhook body is exactly [`Event`] serialized):
//!
//! ```json
//! {"id":"evt_01jddv1r7v0mzg0e3a8m0q0w4h","type":"deploy.started","tenant_id":"tenant-1",
//!  "instance_id":"inst_01jddv1r7v0mzg0e3a8m0q0w4j","actor_id":"alice",
//!  "payload":{"workload_id":"w-1"},"timestamp":"2026-11-27T05:12:01.123456789Z"}
//! ```
//!
//! `instance_id` is omitted when absent, `actor_id` when empty and `payload`
//! when empty. The timestamp is RFC 3339 in UTC with up to nanosecond
//! precision (trailing zeros trimmed, as Go's `time.RFC3339Nano`).

use std::borrow::Cow;
use std::fmt;
use std::io::Write;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{EventError, TypeError};
use crate::id::{EventId, InstanceId};
use crate::limits;

/// Longest event type, in bytes.
pub const MAX_TYPE_LEN: usize = 128;
/// Default limit on the size of an event's payload, as compact JSON.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// An event type: 1–128 characters of `[a-z0-9_.-]`, dot-separated segments
/// (`deploy.rolled_back`), none of them empty.
///
/// Types are open: any valid string is a type. The constants cover the
/// lifecycle events of the control plane this crate grew out of.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Type(Cow<'static, str>);

impl Type {
    /// `instance.created`
    pub const INSTANCE_CREATED: Type = Type::from_static("instance.created");
    /// `instance.started`
    pub const INSTANCE_STARTED: Type = Type::from_static("instance.started");
    /// `instance.stopped`
    pub const INSTANCE_STOPPED: Type = Type::from_static("instance.stopped");
    /// `instance.failed`
    pub const INSTANCE_FAILED: Type = Type::from_static("instance.failed");
    /// `instance.deleted`
    pub const INSTANCE_DELETED: Type = Type::from_static("instance.deleted");
    /// `instance.scaled`
    pub const INSTANCE_SCALED: Type = Type::from_static("instance.scaled");
    /// `instance.suspended`
    pub const INSTANCE_SUSPENDED: Type = Type::from_static("instance.suspended");
    /// `instance.unsuspended`
    pub const INSTANCE_UNSUSPENDED: Type = Type::from_static("instance.unsuspended");
    /// `deploy.started`
    pub const DEPLOY_STARTED: Type = Type::from_static("deploy.started");
    /// `deploy.succeeded`
    pub const DEPLOY_SUCCEEDED: Type = Type::from_static("deploy.succeeded");
    /// `deploy.failed`
    pub const DEPLOY_FAILED: Type = Type::from_static("deploy.failed");
    /// `deploy.rolled_back`
    pub const DEPLOY_ROLLED_BACK: Type = Type::from_static("deploy.rolled_back");
    /// `health.passed`
    pub const HEALTH_PASSED: Type = Type::from_static("health.passed");
    /// `health.failed`
    pub const HEALTH_FAILED: Type = Type::from_static("health.failed");
    /// `health.degraded`
    pub const HEALTH_DEGRADED: Type = Type::from_static("health.degraded");
    /// `health.recovered`
    pub const HEALTH_RECOVERED: Type = Type::from_static("health.recovered");

    /// Every type constant above, grouped instance, deploy, health.
    pub const KNOWN: [Type; 16] = [
        Self::INSTANCE_CREATED,
        Self::INSTANCE_STARTED,
        Self::INSTANCE_STOPPED,
        Self::INSTANCE_FAILED,
        Self::INSTANCE_DELETED,
        Self::INSTANCE_SCALED,
        Self::INSTANCE_SUSPENDED,
        Self::INSTANCE_UNSUSPENDED,
        Self::DEPLOY_STARTED,
        Self::DEPLOY_SUCCEEDED,
        Self::DEPLOY_FAILED,
        Self::DEPLOY_ROLLED_BACK,
        Self::HEALTH_PASSED,
        Self::HEALTH_FAILED,
        Self::HEALTH_DEGRADED,
        Self::HEALTH_RECOVERED,
    ];

    /// A type from a static string, checked when evaluated: a bad literal in
    /// a `const` fails the build, elsewhere it panics.
    pub const fn from_static(s: &'static str) -> Type {
        assert!(check(s).is_ok(), "invalid event type literal");
        Type(Cow::Borrowed(s))
    }

    /// Parses and validates a type.
    ///
    /// # Errors
    /// [`TypeError`] when the string is empty, longer than 128 bytes, has a
    /// character outside `[a-z0-9_.-]`, or an empty dot-separated segment.
    pub fn new(s: impl Into<String>) -> Result<Type, TypeError> {
        let s = s.into();
        check(&s).map_err(|reason| TypeError {
            input: s.clone(),
            reason,
        })?;
        Ok(Type(Cow::Owned(s)))
    }

    /// The type as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks the type rules; the reason on failure.
pub(crate) const fn check(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    if b.is_empty() {
        return Err("is empty");
    }
    if b.len() > MAX_TYPE_LEN {
        return Err("is longer than 128 characters");
    }
    let mut i = 0;
    let mut prev_dot = true; // a leading dot is an empty segment
    while i < b.len() {
        let c = b[i];
        let ok =
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-' || c == b'.';
        if !ok {
            return Err("may only hold the characters a-z 0-9 _ . -");
        }
        if c == b'.' {
            if prev_dot {
                return Err("has an empty segment (leading, trailing or doubled dot)");
            }
            prev_dot = true;
        } else {
            prev_dot = false;
        }
        i += 1;
    }
    if prev_dot {
        return Err("has an empty segment (leading, trailing or doubled dot)");
    }
    Ok(())
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::str::FromStr for Type {
    type Err = TypeError;
    fn from_str(s: &str) -> Result<Self, TypeError> {
        Type::new(s)
    }
}

impl TryFrom<&str> for Type {
    type Error = TypeError;
    fn try_from(s: &str) -> Result<Self, TypeError> {
        Type::new(s)
    }
}

impl AsRef<str> for Type {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for Type {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Type {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Type::new(s).map_err(serde::de::Error::custom)
    }
}

/// One event: something that happened in the control plane.
///
/// Invariants: `payload` is a JSON object (possibly empty); `timestamp` is the
/// event's own time, kept unchanged by every bus (the durable log records its
/// append time separately).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawEvent")]
pub struct Event {
    /// Unique id; publishing is idempotent by it on the durable bus.
    pub id: EventId,
    /// What happened.
    #[serde(rename = "type")]
    pub event_type: Type,
    /// The tenant the event belongs to; may be empty for system events.
    pub tenant_id: String,
    /// The instance concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<InstanceId>,
    /// Who caused it; empty when unknown.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub actor_id: String,
    /// Free-form details.
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub payload: Map<String, Value>,
    /// When it happened, UTC.
    #[serde(serialize_with = "rfc3339_utc::serialize")]
    pub timestamp: Timestamp,
}

impl Event {
    /// A new event of `event_type` for `tenant_id`, with a fresh id and the
    /// current time.
    pub fn new(event_type: Type, tenant_id: impl Into<String>) -> Event {
        // One clock reading for the id and the timestamp.
        let now = std::time::SystemTime::now();
        Event {
            id: EventId::new_at(now),
            event_type,
            tenant_id: tenant_id.into(),
            instance_id: None,
            actor_id: String::new(),
            payload: Map::new(),
            // Out of jiff's range (past 9999) only; `now` panics there too.
            timestamp: Timestamp::try_from(now).unwrap_or_else(|_| Timestamp::now()),
        }
    }

    /// Sets the instance.
    pub fn with_instance(mut self, instance: InstanceId) -> Event {
        self.instance_id = Some(instance);
        self
    }

    /// Sets the actor.
    pub fn with_actor(mut self, actor: impl Into<String>) -> Event {
        self.actor_id = actor.into();
        self
    }

    /// Replaces the payload.
    pub fn with_payload(mut self, payload: Map<String, Value>) -> Event {
        self.payload = payload;
        self
    }

    /// Sets one payload key.
    pub fn with_payload_value(mut self, key: impl Into<String>, value: impl Into<Value>) -> Event {
        self.payload.insert(key.into(), value.into());
        self
    }

    /// Sets the payload key `workload_id`.
    pub fn with_workload(self, workload_id: impl fmt::Display) -> Event {
        self.with_payload_value("workload_id", workload_id.to_string())
    }

    /// Sets the payload key `template_id`.
    pub fn with_template(self, template_id: impl fmt::Display) -> Event {
        self.with_payload_value("template_id", template_id.to_string())
    }

    /// Sets the payload key `datacenter_id`.
    pub fn with_datacenter(self, datacenter_id: impl fmt::Display) -> Event {
        self.with_payload_value("datacenter_id", datacenter_id.to_string())
    }

    /// Sets the id (for importing events made elsewhere).
    pub fn with_id(mut self, id: EventId) -> Event {
        self.id = id;
        self
    }

    /// Sets the timestamp.
    pub fn with_timestamp(mut self, timestamp: Timestamp) -> Event {
        self.timestamp = timestamp;
        self
    }

    /// The payload as compact JSON bytes (`{}` when empty).
    pub fn payload_json(&self) -> Vec<u8> {
        // `serde_json`'s bytes, with a faster string escape (`compact_json`).
        let mut out = Vec::with_capacity(128);
        crate::compact_json::write_object(&self.payload, &mut out);
        out
    }

    /// Checks the payload against a size limit, in bytes of compact JSON.
    /// Costs nothing for an empty payload and stops counting at the limit.
    ///
    /// # Errors
    /// [`EventError::PayloadTooLarge`] when the payload is over `max_bytes`.
    #[inline]
    pub fn check_payload_size(&self, max_bytes: usize) -> Result<(), EventError> {
        if self.payload.is_empty() {
            return Ok(());
        }
        self.check_payload_size_slow(max_bytes)
    }

    /// [`Event::check_payload_size`] for a non-empty payload, out of line so
    /// the common empty case costs a comparison at the call site.
    #[inline(never)]
    fn check_payload_size_slow(&self, max_bytes: usize) -> Result<(), EventError> {
        let mut counter = LimitedCounter {
            count: 0,
            limit: max_bytes,
        };
        if serde_json::to_writer(&mut counter, &self.payload).is_err() || counter.count > max_bytes
        {
            return Err(EventError::PayloadTooLarge { limit: max_bytes });
        }
        Ok(())
    }

    /// Checks everything a bus checks before it writes: `tenant_id` and
    /// `actor_id` lengths, the timestamp's year (0000–9999), the payload's
    /// nesting depth, then its size in bytes of compact JSON (see
    /// [`MAX_TENANT_LEN`](crate::MAX_TENANT_LEN) and the other limits).
    ///
    /// # Errors
    /// [`EventError::FieldTooLong`], [`EventError::Timestamp`],
    /// [`EventError::TooDeep`], [`EventError::PayloadTooLarge`].
    pub fn validate(&self, max_payload_bytes: usize) -> Result<(), EventError> {
        self.validate_but_size()?;
        if self.payload.is_empty() {
            return Ok(());
        }
        self.check_payload_size_slow(max_payload_bytes)
    }

    /// [`Event::validate`] but for the payload's size, for a caller that
    /// serializes the payload anyway and measures that (the durable
    /// publish path: one serialization, not two). The depth check comes
    /// first: serializing recurses.
    pub(crate) fn validate_but_size(&self) -> Result<(), EventError> {
        limits::check_field_lengths(&self.tenant_id, &self.actor_id)?;
        limits::check_timestamp(self.timestamp)?;
        if !self.payload.is_empty() {
            limits::check_payload_depth(self.payload.values())?;
        }
        Ok(())
    }

    /// The event as one line of compact JSON (the webhook body).
    pub fn to_json(&self) -> String {
        // An Event always serializes: its fields are strings, ids, a
        // timestamp and a map of JSON values.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one event from JSON, with every field checked. An `id` that
    /// is `""` or `null` (Go's zero value) counts as missing, and so does a
    /// `null` timestamp. The payload's size is not checked here (that limit
    /// is the bus's); every other limit of [`Event::validate`] is, and
    /// nesting deeper than [`MAX_JSON_DEPTH`](crate::MAX_JSON_DEPTH) or an
    /// integer outside `i64`/`u64` is refused before parsing.
    ///
    /// # Errors
    /// [`EventError`] naming the missing or bad field.
    pub fn from_json(json: &[u8]) -> Result<Event, EventError> {
        Event::parse_json(json, None)
    }

    /// As [`Event::from_json`], but for importing events written without an
    /// id or a time: a missing, `""` or `null` id becomes a fresh one, and a
    /// missing or `null` timestamp becomes `now` (`ctrlbus publish --file`).
    ///
    /// # Errors
    /// As [`Event::from_json`].
    pub fn from_json_or_new(json: &[u8], now: Timestamp) -> Result<Event, EventError> {
        Event::parse_json(json, Some(now))
    }

    /// Parses a payload object from JSON text, with the limits of
    /// [`Event::from_json`] (nesting, integers outside 64 bits) checked
    /// first.
    ///
    /// # Errors
    /// [`EventError::TooDeep`], [`EventError::NumberOutOfRange`],
    /// [`EventError::PayloadNotObject`], [`EventError::Json`].
    pub fn payload_from_json(json: &[u8]) -> Result<Map<String, Value>, EventError> {
        limits::scan_json(json, 2)?;
        match serde_json::from_slice(json).map_err(|e| EventError::Json(e.to_string()))? {
            Value::Object(map) => Ok(map),
            _ => Err(EventError::PayloadNotObject),
        }
    }

    fn parse_json(json: &[u8], defaults: Option<Timestamp>) -> Result<Event, EventError> {
        limits::scan_json(json, 1)?;
        // Through the wire form, so the checks' own variants come back
        // (`serde(try_from)` would flatten them into a message).
        let raw: RawEvent =
            serde_json::from_slice(json).map_err(|e| EventError::Json(e.to_string()))?;
        raw.into_event(defaults)
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json())
    }
}

/// Counts bytes written and fails once past the limit.
struct LimitedCounter {
    count: usize,
    limit: usize,
}

impl Write for LimitedCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.count += buf.len();
        if self.count > self.limit {
            return Err(std::io::Error::other("limit"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The wire form, checked into an [`Event`] by `TryFrom`.
#[derive(Deserialize)]
struct RawEvent {
    id: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default)]
    actor_id: Option<String>,
    #[serde(default)]
    payload: Option<Value>,
    timestamp: Option<String>,
}

impl TryFrom<RawEvent> for Event {
    type Error = EventError;
    fn try_from(raw: RawEvent) -> Result<Event, EventError> {
        raw.into_event(None)
    }
}

impl RawEvent {
    /// Checks the wire form into an event; with `defaults`, a missing id is
    /// a fresh one and a missing timestamp is the time given.
    fn into_event(self, defaults: Option<Timestamp>) -> Result<Event, EventError> {
        let raw = self;
        let id = match (raw.id.filter(|id| !id.is_empty()), defaults) {
            (Some(id), _) => EventId::parse(&id).map_err(EventError::Id)?,
            (None, Some(_)) => EventId::new(),
            (None, None) => return Err(EventError::MissingField("id")),
        };
        let event_type = raw.event_type.ok_or(EventError::MissingField("type"))?;
        let event_type = Type::new(event_type).map_err(EventError::Type)?;
        let instance_id = match raw.instance_id {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => Some(InstanceId::parse(&s).map_err(EventError::Id)?),
        };
        let payload = match raw.payload {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map,
            Some(_) => return Err(EventError::PayloadNotObject),
        };
        let timestamp = match (raw.timestamp, defaults) {
            (Some(t), _) => parse_rfc3339(&t)?,
            (None, Some(now)) => now,
            (None, None) => return Err(EventError::MissingField("timestamp")),
        };
        let tenant_id = raw.tenant_id.unwrap_or_default();
        let actor_id = raw.actor_id.unwrap_or_default();
        limits::check_field_lengths(&tenant_id, &actor_id)?;
        limits::check_payload_depth(payload.values())?;
        Ok(Event {
            id,
            event_type,
            tenant_id,
            instance_id,
            actor_id,
            payload,
            timestamp,
        })
    }
}

/// Parses an RFC 3339 timestamp with any offset into an instant, in years
/// 0000–9999 and without a leap second.
///
/// # Errors
/// [`EventError::Timestamp`] when the string is not RFC 3339 with an
/// offset, is outside years 0000–9999, or is a leap second (`:60`, which
/// would otherwise be read as `:59`).
pub fn parse_rfc3339(s: &str) -> Result<Timestamp, EventError> {
    let t = s
        .parse::<Timestamp>()
        .map_err(|e| EventError::Timestamp(format!("{s:?} is not an RFC 3339 time: {e}")))?;
    limits::check_no_leap_second(s)?;
    limits::check_timestamp(t)?;
    Ok(t)
}

/// Formats an instant as RFC 3339 in UTC, fraction trimmed (Go's `RFC3339Nano`).
pub fn format_rfc3339(t: Timestamp) -> String {
    t.to_string()
}

mod rfc3339_utc {
    use jiff::Timestamp;
    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_rules() {
        for ok in ["a", "deploy.rolled_back", "x-y.z_1", &"a".repeat(128)] {
            assert!(Type::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Deploy.x",
            "deploy..x",
            ".deploy",
            "deploy.",
            "a b",
            "dé",
            &"a".repeat(129),
            "a*",
        ] {
            assert!(Type::new(bad).is_err(), "{bad}");
        }
        assert_eq!(Type::KNOWN.len(), 16);
        assert_eq!(Type::DEPLOY_ROLLED_BACK.as_str(), "deploy.rolled_back");
    }

    #[test]
    fn payload_helpers_use_go_keys() {
        let e = Event::new(Type::DEPLOY_STARTED, "t")
            .with_workload("w1")
            .with_template("tp1")
            .with_datacenter("dc1");
        assert_eq!(e.payload["workload_id"], "w1");
        assert_eq!(e.payload["template_id"], "tp1");
        assert_eq!(e.payload["datacenter_id"], "dc1");
    }

    #[test]
    fn payload_limit() {
        let e = Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("k", "x".repeat(100));
        assert!(e.check_payload_size(1000).is_ok());
        assert!(matches!(
            e.check_payload_size(50),
            Err(EventError::PayloadTooLarge { limit: 50 })
        ));
        assert!(
            Event::new(Type::DEPLOY_STARTED, "t")
                .check_payload_size(0)
                .is_ok()
        );
    }

    #[test]
    fn timestamp_is_utc_with_nanos() {
        let t: Timestamp = "2026-11-27T06:00:00.123456789+02:00".parse().unwrap();
        let e = Event::new(Type::HEALTH_PASSED, "t").with_timestamp(t);
        let json = e.to_json();
        assert!(
            json.contains("\"timestamp\":\"2026-11-27T04:00:00.123456789Z\""),
            "{json}"
        );
    }
}
