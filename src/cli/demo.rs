//! `ctrlbus demo`: a guided run on a scratch log, narrated on standard
//! output: a simulated control plane publishing lifecycle events for two
//! tenants, a durable subscriber, a webhook receiver on 127.0.0.1, a real
//! crash (a child process killed with SIGKILL while publishing) and the
//! resume, and a replay from a timestamp.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ctrlbus::webhook::{DEFAULT_TOLERANCE, verify};
use ctrlbus::{
    Bus, DeliveryOptions, DeliveryWorker, DurableBus, Event, EventId, Filter, HandlerError,
    InstanceId, NewWebhook, Position, Secret, Type,
};
use jiff::Timestamp;

use super::error::{CliError, Result};

/// Acknowledged events the crashing child publishes before it is killed.
const CHILD_ACKS: usize = 12;

/// `demo` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  ctrlbus demo
  ctrlbus demo --keep      # keep the scratch log to explore it afterwards

Runs in a few seconds on a scratch log in the temporary directory; --db is
not used (nothing of yours is touched).")]
pub(crate) struct DemoArgs {
    /// Keep the scratch log and print commands to explore it.
    #[arg(long)]
    keep: bool,
    /// Internal: the child process that publishes until it is killed.
    #[arg(long, hide = true)]
    crash_child: bool,
}

/// Writes one line of narration (errors end the demo; a closed pipe
/// quietly).
fn say(line: impl AsRef<str>) -> Result {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", line.as_ref())?;
    out.flush()?;
    Ok(())
}

/// Narration from handler threads: best effort.
fn note(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs `demo`.
pub(crate) fn run(db: &Path, args: DemoArgs) -> Result {
    if args.crash_child {
        return crash_child(db);
    }
    let dir = scratch_dir()?;
    let result = guided(&dir, args.keep);
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn scratch_dir() -> Result<PathBuf> {
    let nanos = Timestamp::now().as_nanosecond();
    let dir = std::env::temp_dir().join(format!("ctrlbus-demo-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::msg(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

/// The webhook receiver: verifies each request's signature and narrates it.
struct Receiver {
    server: Arc<tiny_http::Server>,
    url: String,
    received: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(secret: Secret) -> Result<Receiver> {
        let server = tiny_http::Server::http("127.0.0.1:0")
            .map_err(|e| CliError::msg(format!("cannot start the webhook receiver: {e}")))?;
        let server = Arc::new(server);
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| CliError::msg("the webhook receiver has no IP address"))?;
        let received = Arc::new(AtomicUsize::new(0));
        let (srv, count) = (server.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            for mut req in srv.incoming_requests() {
                let headers: Vec<(String, String)> = req
                    .headers()
                    .iter()
                    .map(|h| {
                        (
                            h.field.as_str().as_str().to_owned(),
                            h.value.as_str().to_owned(),
                        )
                    })
                    .collect();
                let mut body = Vec::new();
                let _ = req.as_reader().read_to_end(&mut body);
                let verdict = match verify(&secret, &headers, &body, DEFAULT_TOLERANCE) {
                    Ok(()) => "signature verified".to_owned(),
                    Err(e) => format!("SIGNATURE REJECTED: {e}"),
                };
                let what = Event::from_json(&body).map_or_else(
                    |e| format!("unreadable body: {e}"),
                    |e| format!("{} ({}) {}", e.event_type, e.tenant_id, e.id),
                );
                count.fetch_add(1, Ordering::SeqCst);
                note(format!("      webhook receiver <- {what}, {verdict}"));
                let _ = req.respond(tiny_http::Response::empty(204));
            }
        });
        Ok(Receiver {
            server,
            url: format!("http://{addr}/hooks/acme"),
            received,
            thread: Some(thread),
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn delivery_options() -> DeliveryOptions {
    DeliveryOptions {
        workers: 2,
        allow_private_targets: true,
        retry_schedule: vec![Duration::from_millis(100), Duration::from_millis(300)],
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..DeliveryOptions::default()
    }
}

/// The durable subscriber: billing follows every tenant's instance events.
fn billing(bus: &DurableBus, seen: Arc<AtomicUsize>) -> Result<ctrlbus::DurableSubscription> {
    let filter = Filter::types(["instance.*"]).map_err(CliError::msg)?;
    let sub = bus.subscribe_durable("billing", filter, Position::Beginning, move |e: &Event| {
        seen.fetch_add(1, Ordering::SeqCst);
        note(format!(
            "      subscriber billing <- {} ({}) {}",
            e.event_type,
            e.tenant_id,
            e.instance_id.map(|i| i.to_string()).unwrap_or_default()
        ));
        Ok::<(), HandlerError>(())
    })?;
    Ok(sub)
}

fn guided(dir: &Path, keep: bool) -> Result {
    let started = Instant::now();
    let db = dir.join("events.redb");
    say("ctrlbus demo: a control plane's event log, end to end")?;
    say(format!("  scratch log: {}", db.display()))?;
    say("")?;

    // 1. The log, a webhook and a durable subscriber.
    say("1. Open the log and register a webhook for tenant acme's deploy.* events,")?;
    say("   delivered to a receiver on 127.0.0.1 that checks each signature.")?;
    let secret = Secret::generate();
    let receiver = Receiver::start(secret.clone())?;
    let bus = DurableBus::open(&db)?;
    let hook = bus
        .webhooks()
        .allow_private_targets(true)
        .create(NewWebhook {
            tenant_id: "acme".into(),
            url: receiver.url.clone(),
            events: vec!["deploy.*".into()],
            secret: Some(secret.expose().to_owned()),
        })?;
    say(format!(
        "   webhook {} -> {}",
        hook.webhook.id, receiver.url
    ))?;
    let worker = DeliveryWorker::start(bus.clone(), delivery_options())?;
    say("   A durable subscription \"billing\" follows instance.* events of every tenant.")?;
    let seen = Arc::new(AtomicUsize::new(0));
    let sub = billing(&bus, seen.clone())?;
    say("")?;

    // 2. The control plane at work.
    say("2. The control plane publishes lifecycle events for tenants acme and beta.")?;
    say("   Each publish returns once the event is on disk (fsync), and only then")?;
    say("   do subscribers and webhooks see it.")?;
    let (a, b) = (InstanceId::new(), InstanceId::new());
    let script: Vec<Event> = vec![
        Event::new(Type::INSTANCE_CREATED, "acme")
            .with_instance(a)
            .with_actor("alice"),
        Event::new(Type::INSTANCE_CREATED, "beta")
            .with_instance(b)
            .with_actor("bob"),
        Event::new(Type::DEPLOY_STARTED, "acme")
            .with_instance(a)
            .with_payload_value("version", "v2"),
        Event::new(Type::INSTANCE_STARTED, "beta").with_instance(b),
        Event::new(Type::DEPLOY_SUCCEEDED, "acme")
            .with_instance(a)
            .with_payload_value("version", "v2"),
        Event::new(Type::HEALTH_DEGRADED, "beta").with_instance(b),
        Event::new(Type::HEALTH_PASSED, "acme").with_instance(a),
        Event::new(Type::INSTANCE_SCALED, "acme")
            .with_instance(a)
            .with_payload_value("replicas", 3),
    ];
    for event in script {
        let what = format!("{} ({})", event.event_type, event.tenant_id);
        let receipt = bus.publish(event)?;
        say(format!("   published seq {:>2}  {what}", receipt.seq))?;
        std::thread::sleep(Duration::from_millis(40));
    }
    worker.wait_idle(Some(Duration::from_secs(5)));
    say(format!(
        "   -> billing handled {} instance events; the receiver got {} signed deliveries.",
        seen.load(Ordering::SeqCst),
        receiver.received.load(Ordering::SeqCst)
    ))?;
    worker.stop();
    drop(sub);
    bus.close();
    drop(bus);
    let before_crash = Timestamp::now();
    say("")?;

    // 3. A crash.
    say("3. A crash: another process (this binary, as a child) takes over the log")?;
    say(format!(
        "   and publishes; after {CHILD_ACKS} acknowledged events it is killed with SIGKILL,"
    ))?;
    say("   no shutdown, no flush.")?;
    let acked = run_and_kill_child(&db)?;
    say(format!(
        "   child killed after {} acknowledged publishes (seq {}..{}).",
        acked.len(),
        acked.first().map_or(0, |a| a.0),
        acked.last().map_or(0, |a| a.0)
    ))?;
    say("")?;

    // 4. The resume.
    say("4. Restart: reopen the log, resume the subscriber and the deliveries.")?;
    let t0 = Instant::now();
    let bus = DurableBus::open(&db)?;
    say(format!(
        "   reopened in {} ms; the log ends at seq {}.",
        t0.elapsed().as_millis(),
        bus.last_seq()
    ))?;
    let ids: HashSet<EventId> = bus
        .read(Position::Beginning, &Filter::all())?
        .map(|e| e.map(|e| e.event.id))
        .collect::<std::result::Result<_, _>>()?;
    let missing = acked.iter().filter(|(_, id)| !ids.contains(id)).count();
    if missing == 0 {
        say(format!(
            "   every one of the {} acknowledged events survived the kill.",
            acked.len()
        ))?;
    } else {
        return Err(CliError::msg(format!(
            "{missing} acknowledged events are missing after the crash: a durability bug"
        )));
    }
    let cursor = bus.cursor("billing")?;
    say(format!(
        "   billing's cursor was at seq {}; it resumes from seq {} and catches up:",
        cursor.delivered_seq, cursor.next_seq
    ))?;
    let before = receiver.received.load(Ordering::SeqCst);
    seen.store(0, Ordering::SeqCst);
    let sub = billing(&bus, seen.clone())?;
    sub.wait_live(Duration::from_secs(10));
    say(format!(
        "   -> billing caught up {} instance events published while it was down.",
        seen.load(Ordering::SeqCst)
    ))?;
    say("   The child wrote delivery records in the same commits as its events;")?;
    say("   the restarted workers send them:")?;
    let worker = DeliveryWorker::start(bus.clone(), delivery_options())?;
    worker.wait_idle(Some(Duration::from_secs(10)));
    say(format!(
        "   -> {} more deliveries after the restart.",
        receiver.received.load(Ordering::SeqCst) - before
    ))?;
    worker.stop();
    drop(sub);
    say("")?;

    // 5. Replay from a time.
    say(format!(
        "5. Replay from a timestamp: acme's deploy events since {before_crash}"
    ))?;
    say(format!(
        "   (the same as: ctrlbus --db {} replay --since {before_crash} --tenant acme --type 'deploy.*')",
        db.display()
    ))?;
    let filter = Filter::types(["deploy.*"])
        .map_err(CliError::msg)?
        .tenant("acme");
    let mut shown = 0;
    let mut total = 0;
    for entry in bus.read(Position::Time(before_crash), &filter)? {
        let entry = entry?;
        total += 1;
        if shown < 3 {
            say(format!("   {}", entry.to_json()))?;
            shown += 1;
        }
    }
    if total > shown {
        say(format!("   … and {} more", total - shown))?;
    }
    bus.close();
    drop(receiver);
    say("")?;
    say(format!("Done in {:.1} s.", started.elapsed().as_secs_f64()))?;
    if keep {
        say("Explore the log:")?;
        say(format!("  export CTRLBUS_DB={}", db.display()))?;
        say("  ctrlbus stats --format table")?;
        say("  ctrlbus replay --type 'deploy.*' | jq .")?;
        say("  ctrlbus cursors list --format table")?;
        say("  ctrlbus deliveries list --format table")?;
    }
    Ok(())
}

/// Spawns the crashing child, reads its acknowledgements, kills it with
/// SIGKILL after `CHILD_ACKS`, and returns what it acknowledged.
fn run_and_kill_child(db: &Path) -> Result<Vec<(u64, EventId)>> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::msg(format!("cannot find this program: {e}")))?;
    let mut child = Command::new(exe)
        .arg("--db")
        .arg(db)
        .args(["demo", "--crash-child"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CliError::msg(format!("cannot start the child process: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| CliError::msg("no pipe to the child"))?;
    let mut acked = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let mut parts = line.split_whitespace();
        let (Some(seq), Some(id)) = (parts.next(), parts.next()) else {
            continue;
        };
        if let (Ok(seq), Ok(id)) = (seq.parse(), EventId::parse(id)) {
            acked.push((seq, id));
        }
        if acked.len() >= CHILD_ACKS {
            break;
        }
    }
    // Child::kill is SIGKILL on Unix.
    let _ = child.kill();
    let _ = child.wait();
    if acked.is_empty() {
        return Err(CliError::msg("the child process acknowledged nothing"));
    }
    Ok(acked)
}

/// The child: publishes acme events as fast as it can, printing each
/// acknowledged `seq id`, until it is killed.
fn crash_child(db: &Path) -> Result {
    let bus = DurableBus::open(db)?;
    let inst = InstanceId::new();
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let ty = if i % 2 == 0 {
            Type::INSTANCE_SCALED
        } else {
            Type::DEPLOY_STARTED
        };
        let receipt = bus.publish(
            Event::new(ty, "acme")
                .with_instance(inst)
                .with_payload_value("step", i),
        )?;
        writeln!(out, "{} {}", receipt.seq, receipt.id)?;
        out.flush()?;
    }
    Ok(())
}
