//! `--nats URL[,URL…]`: the commands on a NATS JetStream log
//! (`JetStreamBus`), with the same flags and output as on a file.

use ctrlbus::{Bus, JetStreamBus};
use serde::Serialize;

use super::error::{CliError, Result};
use super::output::Out;
use super::{Command, bench, cursors, deliveries, publish, replay, webhooks};

/// Which cluster and stream.
pub(crate) struct Target {
    pub(crate) urls: String,
    pub(crate) stream: String,
}

impl Target {
    fn open(&self) -> Result<JetStreamBus> {
        JetStreamBus::builder()
            .stream(&self.stream)
            .connect(&self.urls)
            .map_err(CliError::from)
    }
}

#[derive(Serialize)]
struct Stats {
    stream: String,
    last_seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    leader: Option<String>,
}

/// Runs one command on the JetStream log.
pub(crate) fn run(target: &Target, command: Command, out: &mut Out) -> Result {
    let not_yet = |what: &str| {
        Err(CliError::msg(format!(
            "`{what}` is not available with --nats yet (it works on a redb file, --db)"
        )))
    };
    match command {
        Command::Publish(args) => publish::run(|| target.open(), args, out),
        Command::Replay(args) => {
            let bus = target.open()?;
            let r = replay::replay_log(&bus, args, out);
            bus.close();
            r
        }
        Command::Tail(args) => {
            let bus = target.open()?;
            replay::tail_log(&bus, args, out)
        }
        Command::Stats => {
            let bus = target.open()?;
            let stats = Stats {
                stream: bus.stream_name().to_owned(),
                last_seq: bus.last_seq()?,
                leader: bus.stream_leader()?,
            };
            bus.close();
            out.record(&stats)?;
            Ok(())
        }
        Command::Compact => Err(CliError::msg(
            "`compact` does not apply to a JetStream log: the servers manage their own storage",
        )),
        Command::Check => not_yet("check"),
        Command::Retain(_) => not_yet("retain"),
        Command::Cursors(cmd) => {
            let bus = target.open()?;
            let r = cursors::run_log(&bus, cmd, out);
            bus.close();
            r
        }
        Command::Webhooks(cmd) => {
            let bus = target.open()?;
            let r = webhooks::run_registry(bus.webhooks(), cmd, out);
            bus.close();
            r
        }
        Command::Deliveries(cmd) => {
            let bus = target.open()?;
            let r = deliveries::run_registry(&bus.webhooks(), cmd, out);
            bus.close();
            r
        }
        Command::Deliver(args) => {
            let bus = target.open()?;
            let r = deliveries::deliver_on(&bus, args, out);
            bus.close();
            r
        }
        Command::Bench(cmd) => {
            let bus = target.open()?;
            let r = bench::run_on(&bus, cmd, out);
            bus.close();
            r
        }
        Command::Demo(_) => not_yet("demo"),
        Command::Completions { shell } => super::completions(shell, out),
    }
}
