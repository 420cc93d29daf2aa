//! Parsers for flag values (TIME, DUR, patterns, ids, JSON payloads). A bad
//! value is a usage error: clap reports it naming the flag, and exits 2.

use std::time::Duration;

use ctrlbus::{EventId, InstanceId, Pattern, Type, WebhookId};
use jiff::Timestamp;
use serde_json::{Map, Value};

/// TIME: RFC 3339, or a span back from now (`15m`).
pub(crate) fn time(s: &str) -> Result<Timestamp, String> {
    ctrlbus::parse_time(s).map_err(|e| e.to_string())
}

/// DUR: `100ms`, `5s`, `2h` ….
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    ctrlbus::parse_duration(s).map_err(|e| e.to_string())
}

/// A list of DURs (a retry schedule). A newtype, so clap takes it as one
/// value rather than many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Durations(pub(crate) Vec<Duration>);

/// `DUR,DUR,…` (empty: none).
pub(crate) fn durations(s: &str) -> Result<Durations, String> {
    if s.trim().is_empty() {
        return Ok(Durations(Vec::new()));
    }
    s.split(',')
        .map(|p| duration(p.trim()))
        .collect::<Result<_, _>>()
        .map(Durations)
}

/// An event type.
pub(crate) fn event_type(s: &str) -> Result<Type, String> {
    Type::new(s).map_err(|e| e.to_string())
}

/// A type pattern (`deploy.*`).
pub(crate) fn pattern(s: &str) -> Result<Pattern, String> {
    Pattern::new(s).map_err(|e| e.to_string())
}

/// An instance id (`inst_…`).
pub(crate) fn instance(s: &str) -> Result<InstanceId, String> {
    InstanceId::parse(s).map_err(|e| e.to_string())
}

/// An event id (`evt_…`).
pub(crate) fn event_id(s: &str) -> Result<EventId, String> {
    EventId::parse(s).map_err(|e| e.to_string())
}

/// A webhook id (`hook_…`).
pub(crate) fn webhook_id(s: &str) -> Result<WebhookId, String> {
    WebhookId::parse(s).map_err(|e| e.to_string())
}

/// A JSON object (an event payload).
pub(crate) fn payload(s: &str) -> Result<Map<String, Value>, String> {
    match ctrlbus::Event::payload_from_json(s.as_bytes()) {
        Ok(m) => Ok(m),
        Err(ctrlbus::EventError::PayloadNotObject) => {
            Err("the payload must be a JSON object, like '{\"version\":\"v2\"}'".into())
        }
        Err(ctrlbus::EventError::Json(e)) => Err(format!("not valid JSON: {e}")),
        Err(e) => Err(e.to_string()),
    }
}
