//! Publish rate with 10 and with 10,000 registered webhooks over 1,000
//! tenants (issue 15's scale case: dispatch cost flat). In both, each
//! published event matches exactly one webhook (so each creates one
//! delivery record); the others are of other tenants, or of the same
//! tenants with patterns the events don't match. The two alternate on fresh
//! logs, 3 rounds each; no worker runs (dispatch only).
//!
//! Usage: `cargo run --release --example webhook_scale [EVENTS]` (default
//! 40,000); prints events/s per round and the ratio of the medians.

#[path = "support/pairs.rs"]
mod pairs;

use ctrlbus::{Bus, DurableBus, Event, NewWebhook, Type};

fn round(webhooks: usize, events: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let bus = DurableBus::open(dir.path().join("events.redb"))?;
    let hooks = bus.webhooks();
    let tenants = 1000;
    for i in 0..webhooks {
        let tenant = format!("tenant-{}", i % tenants);
        // Tenant 0's first webhook takes every deploy; the rest watch health.
        let events = if i == 0 { "deploy.*" } else { "health.*" };
        hooks.create(NewWebhook {
            tenant_id: tenant,
            // A public address literal: checked without a DNS lookup.
            url: format!("https://93.184.215.14/hooks/{i}"),
            events: vec![events.into()],
            secret: None,
        })?;
    }
    let (rate, published) = pairs::publish_rate(&bus, events, || {
        Event::new(Type::DEPLOY_STARTED, "tenant-0")
    });
    let made = hooks.deliveries(&ctrlbus::DeliveryQuery::default())?.len();
    assert_eq!(made, published, "one delivery per event");
    bus.close();
    Ok(rate)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    pairs::alternate(
        &pairs::Pair {
            small: 10,
            large: 10_000,
            small_label: "10 webhooks",
            large_label: "10,000 webhooks",
            ratio_label: "10,000 webhooks / 10",
        },
        round,
    )
}
