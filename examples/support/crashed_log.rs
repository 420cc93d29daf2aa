//! A log whose writer was killed with SIGKILL while publishing, built by a
//! child process (the calling binary again): shared by
//! `examples/reopen_after_crash.rs` and `benches/reopen.rs`.
//!
//! The child builds the log with bulk `publish_batch` (fsync off) until the
//! file is `mib` MiB long, reopens it with the defaults and publishes single
//! durable events until it is killed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ctrlbus::{Bus, DurableBus, Event, Type};

/// Set in the child's environment: `path|mib|quick_repair`.
const CHILD: &str = "CTRLBUS_CRASHED_LOG_CHILD";

/// In the child (`CHILD` set): builds the log and publishes until killed;
/// never returns. Otherwise returns at once. Call first thing in `main`.
pub fn run_child_if_asked() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let mut parts = spec.split('|');
    let (path, mib, quick) = (parts.next(), parts.next(), parts.next());
    child(
        path.unwrap(),
        mib.and_then(|m| m.parse().ok()).unwrap(),
        quick == Some("true"),
    );
}

fn child(path: &str, mib: u64, quick: bool) -> ! {
    let payload = serde_json::json!({"data": "x".repeat(289)});
    let payload = payload.as_object().unwrap().clone();
    let bus = DurableBus::builder()
        .sync(false)
        .quick_repair(quick)
        .open(path)
        .unwrap();
    while std::fs::metadata(path).map_or(0, |m| m.len()) < mib << 20 {
        let batch = (0..10_000)
            .map(|_| Event::new(Type::DEPLOY_STARTED, "t").with_payload(payload.clone()))
            .collect();
        bus.publish_batch(batch).unwrap();
    }
    drop(bus);
    let bus = DurableBus::builder()
        .quick_repair(quick)
        .open(path)
        .unwrap();
    println!("ready");
    loop {
        bus.publish(Event::new(Type::DEPLOY_STARTED, "t").with_payload(payload.clone()))
            .unwrap();
    }
}

/// Builds the log at `path` in a child and kills it with SIGKILL 300 ms
/// after it starts publishing single events.
pub fn crashed_log(path: &Path, mib: u64, quick: bool) {
    let mut c = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, format!("{}|{mib}|{quick}", path.display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "the child did not build the log");
    std::thread::sleep(Duration::from_millis(300));
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
}
