//! Metrics (feature `metrics`, through the `metrics` facade) and the names
//! they go by. Every function is a no-op without the feature, so the code
//! that counts reads the same either way. The application installs the
//! exporter (the CLI: Prometheus, `deliver --metrics-addr`) before it
//! opens the bus: a subscription's labelled handles are made when it
//! starts, and report to the recorder installed then.
//!
//! Labels stay low-cardinality: a subscription's name (chosen by the
//! operator) and a webhook attempt's outcome (four values).

use std::time::Duration;

/// Events appended (duplicates by id not counted).
pub const EVENTS_PUBLISHED: &str = "ctrlbus_events_published_total";
/// Seconds from a publish's call to its receipt (durable, fanned out).
pub const PUBLISH_SECONDS: &str = "ctrlbus_publish_seconds";
/// Events per group commit (one fsync each).
pub const GROUP_COMMIT_EVENTS: &str = "ctrlbus_group_commit_events";
/// Seconds per fsync that makes a group durable (the WAL's `fdatasync`, or
/// without a WAL the redb commit).
pub const FSYNC_SECONDS: &str = "ctrlbus_fsync_seconds";
/// Times a committer waited for the rest of its group (label `outcome`:
/// `filled`, everyone expected came; `ran_out`, the wait's bound passed
/// first). Many `ran_out`s mean publishers take longer to come back than
/// an fsync, and the waits cost latency without saving fsyncs.
pub const GROUP_COMMIT_WAITS: &str = "ctrlbus_group_commit_waits_total";
/// Acknowledged events not yet applied to the redb file.
pub const APPLY_LAG_EVENTS: &str = "ctrlbus_apply_lag_events";
/// Events appended after a durable subscription's position
/// (label `subscription`).
pub const SUBSCRIPTION_LAG_EVENTS: &str = "ctrlbus_subscription_lag_events";
/// Events moved to a subscription's dead letters (label `subscription`).
pub const DEAD_LETTERS: &str = "ctrlbus_dead_letters_total";
/// Webhook delivery attempts (label `outcome`: `success`, `failure`,
/// `timeout`, `refused`).
pub const WEBHOOK_ATTEMPTS: &str = "ctrlbus_webhook_attempts_total";
/// Seconds per webhook delivery attempt.
pub const WEBHOOK_ATTEMPT_SECONDS: &str = "ctrlbus_webhook_attempt_seconds";
/// Webhook deliveries pending (due now or later).
pub const WEBHOOK_PENDING: &str = "ctrlbus_webhook_pending";
/// Webhooks disabled automatically (410 Gone, or failing too long).
pub const WEBHOOKS_DISABLED: &str = "ctrlbus_webhooks_disabled_total";

/// How one webhook delivery attempt ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// A 2xx answer.
    Success,
    /// Any other answer, or a connection error.
    Failure,
    /// No answer within the timeout.
    Timeout,
    /// Not sent: the URL or its address is refused by the policy.
    Refused,
}

impl Attempt {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn label(self) -> &'static str {
        match self {
            Attempt::Success => "success",
            Attempt::Failure => "failure",
            Attempt::Timeout => "timeout",
            Attempt::Refused => "refused",
        }
    }
}

/// Registers every metric's description with the installed recorder, so
/// an exporter can print help text. Call it after installing the recorder;
/// without one (or without the feature `metrics`) it does nothing.
pub fn describe() {
    #[cfg(feature = "metrics")]
    {
        use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
        describe_counter!(EVENTS_PUBLISHED, "Events appended to the log");
        describe_histogram!(
            PUBLISH_SECONDS,
            Unit::Seconds,
            "From publish to receipt: durable and fanned out"
        );
        describe_histogram!(GROUP_COMMIT_EVENTS, "Events per group commit");
        describe_counter!(
            GROUP_COMMIT_WAITS,
            "Waits of a committer for the rest of its group, by outcome"
        );
        describe_histogram!(
            FSYNC_SECONDS,
            Unit::Seconds,
            "The fsync that makes a group durable"
        );
        describe_gauge!(
            APPLY_LAG_EVENTS,
            "Acknowledged events not yet in the redb file"
        );
        describe_gauge!(
            SUBSCRIPTION_LAG_EVENTS,
            "Events after a durable subscription's position"
        );
        describe_counter!(
            DEAD_LETTERS,
            "Events moved to a subscription's dead letters"
        );
        describe_counter!(WEBHOOK_ATTEMPTS, "Webhook delivery attempts by outcome");
        describe_histogram!(
            WEBHOOK_ATTEMPT_SECONDS,
            Unit::Seconds,
            "One webhook delivery attempt"
        );
        describe_gauge!(WEBHOOK_PENDING, "Webhook deliveries pending");
        describe_counter!(WEBHOOKS_DISABLED, "Webhooks disabled automatically");
    }
}

/// A group of `events` new events was made durable.
pub(crate) fn committed(events: usize) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!(EVENTS_PUBLISHED).increment(events as u64);
        metrics::histogram!(GROUP_COMMIT_EVENTS).record(events as f64);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = events;
}

/// A committer waited for the rest of its group; `filled` if all it
/// expected came.
pub(crate) fn group_waited(filled: bool) {
    #[cfg(feature = "metrics")]
    {
        let outcome = if filled { "filled" } else { "ran_out" };
        metrics::counter!(GROUP_COMMIT_WAITS, "outcome" => outcome).increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = filled;
}

/// A publish got its receipt `took` after it was called.
pub(crate) fn published(took: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(PUBLISH_SECONDS).record(took.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = took;
}

/// The fsync that made a group durable took `took`.
pub(crate) fn fsync(took: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(FSYNC_SECONDS).record(took.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = took;
}

/// `events` acknowledged events are not yet in the redb file.
pub(crate) fn apply_lag(events: u64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(APPLY_LAG_EVENTS).set(events as f64);
    #[cfg(not(feature = "metrics"))]
    let _ = events;
}

/// `ctrlbus_subscription_lag_events` of one subscription: its labelled
/// handle is made once, when the subscription starts, not on every group
/// after which it is set (the label is an owned string). Like every handle
/// of the facade, it reports to the recorder installed when it was made.
pub(crate) struct LagGauge {
    #[cfg(feature = "metrics")]
    gauge: metrics::Gauge,
}

impl LagGauge {
    /// The gauge of the subscription `name`.
    pub(crate) fn new(name: &str) -> LagGauge {
        #[cfg(not(feature = "metrics"))]
        let _ = name;
        LagGauge {
            #[cfg(feature = "metrics")]
            gauge: metrics::gauge!(SUBSCRIPTION_LAG_EVENTS, "subscription" => name.to_owned()),
        }
    }

    /// The subscription is `events` behind the newest event.
    #[cfg_attr(not(feature = "metrics"), allow(clippy::unused_self))]
    pub(crate) fn set(&self, events: u64) {
        #[cfg(feature = "metrics")]
        self.gauge.set(events as f64);
        #[cfg(not(feature = "metrics"))]
        let _ = events;
    }
}

/// The subscription `name` dead-lettered an event.
pub(crate) fn dead_lettered(name: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(DEAD_LETTERS, "subscription" => name.to_owned()).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = name;
}

/// A webhook delivery attempt ended with `outcome` after `took`.
pub(crate) fn webhook_attempt(outcome: Attempt, took: Duration) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!(WEBHOOK_ATTEMPTS, "outcome" => outcome.label()).increment(1);
        metrics::histogram!(WEBHOOK_ATTEMPT_SECONDS).record(took.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (outcome, took);
}

/// `n` webhook deliveries are pending.
pub(crate) fn webhook_pending(n: u64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(WEBHOOK_PENDING).set(n as f64);
    #[cfg(not(feature = "metrics"))]
    let _ = n;
}

/// A webhook was disabled automatically.
pub(crate) fn webhook_disabled() {
    #[cfg(feature = "metrics")]
    metrics::counter!(WEBHOOKS_DISABLED).increment(1);
}
