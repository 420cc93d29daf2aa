//! `ctrlbus deliveries` (delivery records and attempt logs) and
//! `ctrlbus deliver` (the delivery workers).

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use ctrlbus::{
    Bus, Deliverer, DeliveryAttempt, DeliveryId, DeliveryOptions, DeliveryQuery, DeliveryStatus,
    EventLog, WebhookDelivery, WebhookId, WebhookRegistry,
};
use serde::Serialize;

use super::error::{CliError, Result};
use super::output::Out;
use super::{open, values};

/// `deliveries` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// List delivery records, oldest first (works while another process
    /// holds the log).
    #[command(after_help = "\
Examples:
  ctrlbus deliveries list --status failed --format table
  ctrlbus deliveries list --webhook hook_01jddv1r7v0mzg0e3a8m0q0w4h --limit 20")]
    List {
        /// Only this webhook's.
        #[arg(long, value_name = "ID", value_parser = values::webhook_id)]
        webhook: Option<WebhookId>,
        /// Only those in this state.
        #[arg(long, value_name = "STATUS", value_parser = status)]
        status: Option<DeliveryStatus>,
        /// At most N.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Show one delivery and its attempt log.
    #[command(after_help = "Example:\n  ctrlbus deliveries show deli_01jddv1r7v0mzg0e3a8m0q0w4h")]
    Show {
        /// The delivery's id (`deli_…`).
        #[arg(value_parser = delivery_id)]
        id: DeliveryId,
    },
    /// Make a delivery due again now (a failed one becomes pending).
    #[command(after_help = "Example:\n  ctrlbus deliveries retry deli_01jddv1r7v0mzg0e3a8m0q0w4h")]
    Retry {
        /// The delivery's id.
        #[arg(value_parser = delivery_id)]
        id: DeliveryId,
    },
}

fn status(s: &str) -> std::result::Result<DeliveryStatus, String> {
    s.parse()
}

fn delivery_id(s: &str) -> std::result::Result<DeliveryId, String> {
    DeliveryId::parse(s).map_err(|e| e.to_string())
}

const COLUMNS: [(&str, &str); 8] = [
    ("ID", "id"),
    ("WEBHOOK", "webhook_id"),
    ("SEQ", "seq"),
    ("STATUS", "status"),
    ("CODE", "status_code"),
    ("ATTEMPTS", "attempts"),
    ("NEXT_RETRY", "next_retry"),
    ("ERROR", "error"),
];

/// A delivery with its attempts, as `deliveries show` prints it.
#[derive(Serialize)]
struct Shown {
    #[serde(flatten)]
    delivery: WebhookDelivery,
    attempt_log: Vec<DeliveryAttempt>,
}

/// Runs a `deliveries` subcommand on the file at `db`.
pub(crate) fn run(db: &Path, cmd: Command, out: &mut Out) -> Result {
    match cmd {
        Command::List {
            webhook,
            status,
            limit,
        } => {
            let log = open::read_only(db)?;
            let q = DeliveryQuery {
                webhook_id: webhook,
                status,
                limit,
            };
            out.list(&COLUMNS, &log.webhook_deliveries(&q)?)?;
        }
        Command::Show { id } => {
            let log = open::read_only(db)?;
            let delivery = log.webhook_delivery(id)?;
            let attempt_log = log.webhook_attempts(id)?;
            out.record(&Shown {
                delivery,
                attempt_log,
            })?;
        }
        cmd @ Command::Retry { .. } => {
            let bus = open::writable(db, false)?;
            let r = run_registry(&bus.webhooks(), cmd, out);
            bus.close();
            r?;
        }
    }
    Ok(())
}

/// Runs a `deliveries` subcommand on any registry (`--nats`; retry on a
/// file).
pub(crate) fn run_registry<R: WebhookRegistry>(hooks: &R, cmd: Command, out: &mut Out) -> Result {
    match cmd {
        Command::List {
            webhook,
            status,
            limit,
        } => {
            let q = DeliveryQuery {
                webhook_id: webhook,
                status,
                limit,
            };
            out.list(&COLUMNS, &hooks.deliveries(&q)?)?;
        }
        Command::Show { id } => {
            let delivery = hooks.delivery(id)?;
            let attempt_log = hooks.attempts(id)?;
            out.record(&Shown {
                delivery,
                attempt_log,
            })?;
        }
        Command::Retry { id } => out.record(&hooks.retry(id)?)?,
    }
    Ok(())
}

/// `deliver` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  ctrlbus deliver --workers 8
  ctrlbus deliver --until-idle --retry-schedule 1s,5s,30s --timeout 10s
  ctrlbus deliver --allow-private-targets     # a receiver on 127.0.0.1

Runs until SIGINT or SIGTERM (attempts in flight finish and are recorded;
the rest stay pending for the next run), or with --until-idle until no
delivery is pending. Reading commands keep working meanwhile. Prints a
summary line of the deliveries by status when it stops.")]
pub(crate) struct DeliverArgs {
    /// Attempts in flight at once.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    workers: u64,
    /// Deliver to loopback, private and link-local addresses too.
    #[arg(long)]
    allow_private_targets: bool,
    /// Waits between attempts; its length + 1 attempts in all (default
    /// 5s,5m,30m,2h,5h,10h,10h).
    #[arg(long, value_name = "DUR,DUR,…", value_parser = values::durations)]
    retry_schedule: Option<values::Durations>,
    /// Timeout per attempt, connect to last byte (default 15s).
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    timeout: Option<Duration>,
    /// Stop once no delivery is pending (waiting for scheduled retries).
    #[arg(long)]
    until_idle: bool,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics while
    /// delivering (port 0 picks one; the address is printed on stderr).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Serialize)]
struct Summary {
    stopped_by: &'static str,
    pending: usize,
    succeeded: usize,
    failed: usize,
}

/// Runs `deliver` on the file at `db`.
pub(crate) fn deliver(db: &Path, args: DeliverArgs, out: &mut Out) -> Result {
    let bus = open::writable(db, true)?;
    let r = deliver_on(&bus, args, out);
    bus.close();
    r
}

/// Runs `deliver` on any log. On `--nats`, several `deliver` processes on
/// one stream share the work.
pub(crate) fn deliver_on<L: EventLog>(log: &L, args: DeliverArgs, out: &mut Out) -> Result {
    let mut opts = DeliveryOptions {
        workers: args.workers as usize,
        allow_private_targets: args.allow_private_targets,
        ..DeliveryOptions::default()
    };
    if let Some(s) = args.retry_schedule {
        opts.retry_schedule = s.0;
    }
    if let Some(t) = args.timeout {
        if t.is_zero() {
            return Err(CliError::Usage("--timeout must be positive".into()));
        }
        opts.timeout = t;
        opts.connect_timeout = opts.connect_timeout.min(t);
    }
    let (tx, rx) = mpsc::channel::<()>();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .map_err(|e| CliError::msg(format!("cannot install the signal handler: {e}")))?;

    if let Some(addr) = args.metrics_addr {
        let bound = super::metrics::serve(addr)?;
        eprintln!("ctrlbus: serving metrics at http://{bound}/metrics");
    }
    let worker = log.start_delivery(opts).map_err(CliError::msg)?;
    let stopped_by = loop {
        if args.until_idle {
            if worker.wait_idle(Some(Duration::from_millis(200))) {
                break "idle";
            }
            if rx.try_recv().is_ok() {
                break "signal";
            }
        } else if rx.recv().is_ok() {
            break "signal";
        }
    };
    worker.stop();
    let hooks = log.webhook_registry();
    let count = |status| {
        hooks
            .deliveries(&DeliveryQuery {
                status: Some(status),
                ..DeliveryQuery::default()
            })
            .map(|d| d.len())
    };
    let summary = Summary {
        stopped_by,
        pending: count(DeliveryStatus::Pending)?,
        succeeded: count(DeliveryStatus::Succeeded)?,
        failed: count(DeliveryStatus::Failed)?,
    };
    out.record(&summary)?;
    Ok(())
}
