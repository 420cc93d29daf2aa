//! Helpers shared by the integration tests (each test crate uses some).
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use ctrlbus::{Event, EventId, HandlerError};

/// The ids a handler saw, in the order it saw them.
pub type Log = Arc<Mutex<Vec<EventId>>>;

/// A handler that appends the id of every event it gets to `log`.
pub fn recorder(log: &Log) -> impl Fn(&Event) -> Result<(), HandlerError> + Send + Sync + 'static {
    let log = log.clone();
    move |e: &Event| {
        log.lock().unwrap().push(e.id);
        Ok(())
    }
}

/// The headers of a request to a test webhook receiver, names lowercased.
pub fn headers(req: &tiny_http::Request) -> std::collections::HashMap<String, String> {
    req.headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_ascii_lowercase(),
                h.value.as_str().to_owned(),
            )
        })
        .collect()
}
