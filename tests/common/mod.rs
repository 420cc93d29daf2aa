//! Helpers shared by the integration tests (each test crate uses some).
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

pub mod backend;
pub mod nats;
pub mod receiver;
pub mod stored;

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

/// xorshift64*: enough randomness for kill delays and cancellation
/// points, seeded by the test (and printed, so a run can be repeated).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A webhook for every event of `tenant`, to `url`, with a generated
/// secret.
pub fn hook_for(tenant: &str, url: &str) -> ctrlbus::NewWebhook {
    ctrlbus::NewWebhook {
        tenant_id: tenant.into(),
        url: url.into(),
        events: Vec::new(),
        secret: None,
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

/// Waits up to 20 s for `cond`, failing the test naming `what`.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The durable subscription "audit" of every event from the beginning,
/// recording into `log`.
pub fn audit(bus: &ctrlbus::DurableBus, log: &Log) -> ctrlbus::DurableSubscription {
    bus.subscribe_durable(
        "audit",
        ctrlbus::Filter::all(),
        ctrlbus::Position::Beginning,
        recorder(log),
    )
    .unwrap()
}

/// Runs this test binary's test `test` alone, in a child process with
/// `env` set, its standard output piped (crash tests kill it with SIGKILL).
pub fn spawn_self(test: &str, env: (&str, String)) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads `<seq> <id>` receipt lines from a child until it prints `ready`.
/// The harness may print `test NAME ... ` before the first line.
pub fn receipts_until_ready(child: &mut std::process::Child) -> Vec<(u64, EventId)> {
    use std::io::BufRead;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.ends_with("ready") {
            break;
        }
        let mut tokens = line.split_whitespace().rev();
        if let (Some(id), Some(seq)) = (tokens.next(), tokens.next())
            && let (Ok(seq), Ok(id)) = (seq.parse(), EventId::parse(id))
        {
            out.push((seq, id));
        }
    }
    out
}

/// `(seq, id)` of every event in the log, in `seq` order.
pub fn seq_ids(bus: &ctrlbus::DurableBus) -> Vec<(u64, EventId)> {
    bus.read(ctrlbus::Position::Beginning, &ctrlbus::Filter::all())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.seq, e.event.id)
        })
        .collect()
}
