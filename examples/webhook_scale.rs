//! Publish rate with 10 and with 10,000 registered webhooks over 1,000
//! tenants (issue 15's scale case: dispatch cost flat). In both, each
//! published event matches exactly one webhook (so each creates one
//! delivery record); the others are of other tenants, or of the same
//! tenants with patterns the events don't match. The two alternate on fresh
//! logs, 3 rounds each; no worker runs (dispatch only).
//!
//! Usage: `cargo run --release --example webhook_scale [EVENTS]` (default
//! 40,000); prints events/s per round and the ratio of the medians.

use std::time::Instant;

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
    let threads = 16;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let bus = bus.clone();
            s.spawn(move || {
                for _ in 0..events / threads {
                    bus.publish(Event::new(Type::DEPLOY_STARTED, "tenant-0"))
                        .expect("publish");
                }
            });
        }
    });
    let rate = events as f64 / start.elapsed().as_secs_f64();
    let made = hooks.deliveries(&ctrlbus::DeliveryQuery::default())?.len();
    assert_eq!(made, events / threads * threads, "one delivery per event");
    bus.close();
    Ok(rate)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let events: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 40_000,
    };
    let (mut few, mut many) = (Vec::new(), Vec::new());
    for r in 0..3 {
        few.push(round(10, events)?);
        many.push(round(10_000, events)?);
        println!(
            "round {r}: 10 webhooks {:.0} events/s, 10,000 webhooks {:.0} events/s",
            few[r], many[r]
        );
    }
    println!(
        "10,000 webhooks / 10: {:.3} (medians)",
        median(many) / median(few)
    );
    Ok(())
}
