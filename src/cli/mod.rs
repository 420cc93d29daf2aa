//! The `ctrlbus` command line (compiled with the `cli` feature).
//!
//! Shape (after ripgrep): `main` parses flags and calls `run`, which
//! dispatches to one module per command group and returns a [`Result`];
//! errors are printed once, as `ctrlbus: …`, and mapped to the exit code:
//! 0 success, 1 runtime error, 2 usage error. A closed standard output
//! (`ctrlbus replay | head -1`) ends the run quietly with 0.

mod bench;
mod cpu_time;
mod cursors;
mod deliveries;
mod demo;
mod error;
mod filter_args;
mod metrics;
mod nats;
mod open;
mod operations;
mod output;
mod progress;
mod publish;
mod replay;
mod values;
mod webhooks;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use error::{CliError, Result};
use output::{Format, Out};

/// A durable event log and event bus for control planes: publish, replay and
/// audit the log, manage cursors and webhooks, run deliveries.
#[derive(Debug, Parser)]
#[command(
    name = "ctrlbus",
    version,
    propagate_version = true,
    arg_required_else_help = true
)]
#[command(after_help = "\
Output is JSON, one object per line (`--format table` for people).
TIME is RFC 3339 (2026-01-02T03:04:05Z) or a span back from now (30s, 15m, 2h, 7d).
DUR is 100ms, 5s, 2h, 1h30m ….
Exit codes: 0 success, 1 runtime error, 2 usage error.

Examples:
  ctrlbus demo
  ctrlbus publish deploy.started --tenant acme --payload '{\"version\":\"v2\"}'
  ctrlbus replay --since 15m --type 'deploy.*' | jq .
  ctrlbus tail --follow --tenant acme")]
pub(crate) struct Cli {
    /// The log file.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "CTRLBUS_DB",
        default_value = "./ctrlbus.redb"
    )]
    db: PathBuf,
    /// Run on a NATS JetStream cluster instead of a file: the servers'
    /// URLs, comma-separated (`nats://host:4222,…`).
    #[arg(long, global = true, value_name = "URL[,URL…]", env = "CTRLBUS_NATS")]
    nats: Option<String>,
    /// With --nats: the stream that holds the log.
    #[arg(long, global = true, value_name = "NAME", default_value = "ctrlbus")]
    stream: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Json)]
    format: Format,
    /// More log lines on standard error: -v info, -vv debug, -vvv trace
    /// (default: warnings and errors, or what `RUST_LOG` says when set).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Only errors on standard error, no warnings.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Open the log even though the write-ahead log it was written through
    /// is missing, another log's or an older copy: the events acknowledged
    /// through it and not yet in the file are lost, and their seqs reused.
    #[arg(long, global = true)]
    accept_wal_loss: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Publish one event, or the JSON lines of a file.
    Publish(publish::Args),
    /// Print matching events in log order, one JSON line each.
    Replay(replay::ReplayArgs),
    /// Print the newest events; --follow keeps printing new ones.
    Tail(replay::TailArgs),
    /// Named durable subscriptions: list, show, seek, delete.
    #[command(subcommand)]
    Cursors(cursors::Command),
    /// Webhooks: add, list, show, update, enable, disable, rotate-secret,
    /// rm, replay.
    #[command(subcommand)]
    Webhooks(webhooks::Command),
    /// Webhook delivery records and attempt logs: list, show, retry.
    #[command(subcommand)]
    Deliveries(deliveries::Command),
    /// Run the webhook delivery workers until SIGINT/SIGTERM (or
    /// --until-idle).
    Deliver(deliveries::DeliverArgs),
    /// Counts and bounds of the log.
    #[command(after_help = "Example:\n  ctrlbus stats --format table")]
    Stats,
    /// Verify every record and index entry; exits 1 with a report if any is
    /// unsound.
    #[command(after_help = "Example:\n  ctrlbus check || echo 'damaged'")]
    Check,
    /// Return space freed by retention to the file system (the log must not
    /// be open anywhere).
    #[command(after_help = "Example:\n  ctrlbus compact")]
    Compact,
    /// Remove the oldest events.
    Retain(operations::RetainArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::Command),
    /// A guided run on a scratch log: a simulated control plane, a durable
    /// subscriber, a local webhook receiver, a crash and the resume.
    Demo(demo::DemoArgs),
    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
  ctrlbus completions bash > ~/.local/share/bash-completion/completions/ctrlbus
  ctrlbus completions zsh > ~/.zfunc/_ctrlbus
  ctrlbus completions fish > ~/.config/fish/completions/ctrlbus.fish")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Parses the command line, runs it, and turns the outcome into the exit
/// code.
pub(crate) fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_exit(&e),
    };
    init_logging(cli.verbose, cli.quiet);
    open::accept_wal_loss(cli.accept_wal_loss);
    let mut out = Out::new(cli.format);
    let result = run(cli, &mut out).and_then(|()| out.flush().map_err(CliError::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match &e {
                CliError::Usage(m) | CliError::Runtime(m) => {
                    // Anything already produced goes out first.
                    let _ = out.flush();
                    eprintln!("ctrlbus: {m}");
                }
                CliError::BrokenPipe => {}
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// Sends the library's `tracing` events to standard error: `RUST_LOG` when
/// set (`RUST_LOG=ctrlbus=debug`), else warnings and errors, more with
/// `-v`, errors only with `-q`. Lines are plain text, no color unless
/// standard error is a terminal.
fn init_logging(verbose: u8, quiet: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() && verbose == 0 && !quiet => {
            EnvFilter::try_new(v).unwrap_or_else(|_| EnvFilter::new(level))
        }
        _ => EnvFilter::new(level),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Help and version go to standard output with 0; usage errors print one
/// line and exit 2.
fn usage_exit(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprint!("{}", e.render());
            ExitCode::from(error::EXIT_USAGE)
        }
        _ => {
            eprintln!("ctrlbus: {}", error::one_line_usage(e));
            ExitCode::from(error::EXIT_USAGE)
        }
    }
}

/// Runs one command.
fn run(cli: Cli, out: &mut Out) -> Result {
    if let Some(urls) = &cli.nats {
        let target = nats::Target {
            urls: urls.clone(),
            stream: cli.stream.clone(),
        };
        return nats::run(&target, cli.command, out);
    }
    let db = cli.db.as_path();
    match cli.command {
        Command::Publish(args) => publish::run(|| open::for_publish(db), args, out),
        Command::Replay(args) => replay::replay(db, args, out),
        Command::Tail(args) => replay::tail(db, args, out),
        Command::Cursors(cmd) => cursors::run(db, cmd, out),
        Command::Webhooks(cmd) => webhooks::run(db, cmd, out),
        Command::Deliveries(cmd) => deliveries::run(db, cmd, out),
        Command::Deliver(args) => deliveries::deliver(db, args, out),
        Command::Stats => operations::stats(db, out),
        Command::Check => operations::check(db, out),
        Command::Compact => operations::compact(db, out),
        Command::Retain(args) => operations::retain(db, args, out),
        Command::Bench(cmd) => bench::run(db, cmd, out),
        Command::Demo(args) => demo::run(db, args),
        Command::Completions { shell } => completions(shell, out),
    }
}

/// Prints the completion script for `shell`.
pub(crate) fn completions(shell: clap_complete::Shell, out: &mut Out) -> Result {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "ctrlbus", &mut buf);
    out.raw(&buf)?;
    Ok(())
}
