//! `ctrlbus stats`, `check`, `compact` and `retain`: looking after the file.

use std::path::Path;
use std::time::Duration;

use ctrlbus::{Bus, DurableBus, Retention};
use serde::Serialize;

use super::error::{CliError, Result};
use super::output::Out;
use super::{open, progress, values};

/// `retain` flags.
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("limits").required(true).multiple(true))]
#[command(after_help = "\
Examples:
  ctrlbus retain --max-age 30d
  ctrlbus retain --max-events 1000000

Sequence numbers are never reused; cursors behind the new oldest event skip to
it. Run `ctrlbus compact` afterwards to return the space to the file system.")]
pub(crate) struct RetainArgs {
    /// Remove events appended longer ago than DUR.
    #[arg(long, value_name = "DUR", value_parser = values::duration, group = "limits")]
    max_age: Option<Duration>,
    /// Keep at most N events.
    #[arg(long, value_name = "N", group = "limits")]
    max_events: Option<u64>,
}

/// Runs `stats` (read-only).
pub(crate) fn stats(db: &Path, out: &mut Out) -> Result {
    let log = open::read_only(db)?;
    let mut stats = log.stats()?;
    if stats.file_bytes.is_none() {
        stats.file_bytes = std::fs::metadata(db).ok().map(|m| m.len());
    }
    out.record(&stats)?;
    Ok(())
}

/// Runs `check` (read-only): exits 1 with the report if anything is
/// unsound.
pub(crate) fn check(db: &Path, out: &mut Out) -> Result {
    let log = open::read_only(db)?;
    let pb = progress::spinner("checking every record and index entry");
    let report = log.check();
    pb.finish_and_clear();
    let report = report?;
    out.record(&report)?;
    if report.is_sound() {
        Ok(())
    } else {
        out.flush()?;
        Err(CliError::msg(format!(
            "check found {} problem(s) in {}",
            report.problems.len(),
            db.display()
        )))
    }
}

#[derive(Serialize)]
struct Compacted {
    bytes_before: u64,
    bytes_after: u64,
}

/// Runs `compact` (needs the log closed everywhere).
pub(crate) fn compact(db: &Path, out: &mut Out) -> Result {
    if !db.exists() {
        return Err(CliError::msg(format!("no log at {}", db.display())));
    }
    let pb = progress::spinner("compacting");
    let result = DurableBus::compact(db);
    pb.finish_and_clear();
    let (bytes_before, bytes_after) = result.map_err(open::open_error)?;
    out.record(&Compacted {
        bytes_before,
        bytes_after,
    })?;
    Ok(())
}

/// Runs `retain`.
pub(crate) fn retain(db: &Path, args: RetainArgs, out: &mut Out) -> Result {
    let bus = open::writable(db, false)?;
    let policy = Retention {
        max_age: args.max_age,
        max_events: args.max_events,
        ..Retention::default()
    };
    let report = bus.retain(&policy)?;
    bus.close();
    out.record(&report)?;
    Ok(())
}
