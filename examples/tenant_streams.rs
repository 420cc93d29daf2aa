//! Publish cost beside many active durable consumers that each want another
//! tenant's events (issue 15's scale case for active consumers, and "one
//! tenant slowing another"). Each round opens a fresh log, starts N durable
//! consumers filtered to tenants `t-0`..`t-N`, then times 16 threads
//! publishing tenant `hot`'s events, which none wants; N = 1 and N = 200
//! alternate, 3 rounds each. The consumers are `durable_stream`s, each
//! awaited by a task, or with `handlers` live `subscribe_durable` handlers.
//!
//! Usage: `cargo run --release --features tokio --example tenant_streams
//! [EVENTS [streams|handlers]]` (defaults 40,000 and streams); prints
//! events/s per round and the ratio of the medians.

#[path = "support/pairs.rs"]
mod pairs;

use ctrlbus::{Bus, DurableBus, Event, Filter, HandlerError, Position, Type};
use futures::StreamExt;

fn round(
    consumers: usize,
    events: usize,
    handlers: bool,
) -> Result<f64, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let bus = DurableBus::open(dir.path().join("events.redb"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (mut tasks, mut subs) = (Vec::new(), Vec::new());
    for i in 0..consumers {
        let (name, filter) = (
            format!("consumer-{i}"),
            Filter::all().tenant(format!("t-{i}")),
        );
        if handlers {
            subs.push(bus.subscribe_durable(
                &name,
                filter,
                Position::Beginning,
                |_: &Event| -> Result<(), HandlerError> { Ok(()) },
            )?);
            continue;
        }
        let mut stream = bus.durable_stream(&name, filter, Position::Beginning)?;
        tasks.push(rt.spawn(async move {
            while let Some(d) = stream.next().await {
                if let Ok(d) = d {
                    let _ = d.ack().await;
                }
            }
        }));
    }
    let (rate, _) = pairs::publish_rate(&bus, events, || {
        Event::new(Type::DEPLOY_STARTED, "hot").with_payload_value("k", 1)
    });
    for t in &tasks {
        t.abort();
    }
    drop((tasks, subs));
    bus.close();
    Ok(rate)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let handlers = match std::env::args().nth(2).as_deref() {
        None | Some("streams") => false,
        Some("handlers") => true,
        Some(other) => return Err(format!("expected streams or handlers, got {other}").into()),
    };
    let (small_label, large_label, ratio_label) = if handlers {
        ("1 handler", "200 handlers", "200 tenant handlers / 1")
    } else {
        ("1 stream", "200 streams", "200 tenant streams / 1")
    };
    pairs::alternate(
        &pairs::Pair {
            small: 1,
            large: 200,
            small_label,
            large_label,
            ratio_label,
        },
        |n, events| round(n, events, handlers),
    )
}
