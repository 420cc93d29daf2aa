//! `ctrlbus cursors`: the named durable subscriptions' positions.

use std::path::Path;

use ctrlbus::{Bus, CursorInfo, DeadLetter, EventLog, Position};
use jiff::Timestamp;
use serde::Serialize;

use super::error::Result;
use super::output::Out;
use super::{open, values};

/// `cursors` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// List every cursor (works while another process holds the log).
    #[command(after_help = "Example:\n  ctrlbus cursors list --format table")]
    List,
    /// Show one cursor and its dead letters.
    #[command(after_help = "Example:\n  ctrlbus cursors show billing")]
    Show {
        /// The subscription's name.
        name: String,
    },
    /// Move a cursor: its subscription next receives the event at the new
    /// position (replay from a time, or skip to the end).
    #[command(after_help = "\
Examples:
  ctrlbus cursors seek billing --to 2h
  ctrlbus cursors seek billing --to-seq 1200
  ctrlbus cursors seek billing --end")]
    #[command(group = clap::ArgGroup::new("position").required(true).multiple(false))]
    Seek {
        /// The subscription's name.
        name: String,
        /// To the first event appended at or after TIME.
        #[arg(long, value_name = "TIME", value_parser = values::time, group = "position")]
        to: Option<Timestamp>,
        /// To the event with this sequence number.
        #[arg(long, value_name = "N", group = "position")]
        to_seq: Option<u64>,
        /// To the oldest retained event.
        #[arg(long, group = "position")]
        beginning: bool,
        /// Past the newest event: only new events.
        #[arg(long, group = "position")]
        end: bool,
    },
    /// Delete a cursor and its dead letters.
    #[command(after_help = "Example:\n  ctrlbus cursors delete billing")]
    Delete {
        /// The subscription's name.
        name: String,
    },
}

const COLUMNS: [(&str, &str); 7] = [
    ("NAME", "name"),
    ("DELIVERED", "delivered_seq"),
    ("LAG", "lag"),
    ("STATE", "state"),
    ("DEAD", "dead_letters"),
    ("FILTER", "filter"),
    ("UPDATED", "updated_at"),
];

/// A cursor with its dead letters, as `cursors show` prints it.
#[derive(Serialize)]
struct Shown {
    #[serde(flatten)]
    cursor: CursorInfo,
    dead_letter_events: Vec<DeadLetter>,
}

/// Runs a `cursors` subcommand on the file at `db`.
pub(crate) fn run(db: &Path, cmd: Command, out: &mut Out) -> Result {
    match cmd {
        Command::List => {
            let log = open::read_only(db)?;
            out.list(&COLUMNS, &log.cursors()?)?;
        }
        Command::Show { name } => {
            let log = open::read_only(db)?;
            let cursor = log.cursor(&name)?;
            let dead = log.dead_letters(&name)?;
            out.record(&Shown {
                cursor,
                dead_letter_events: dead,
            })?;
        }
        cmd => {
            let bus = open::writable(db, false)?;
            let r = run_log(&bus, cmd, out);
            bus.close();
            r?;
        }
    }
    Ok(())
}

/// Runs a `cursors` subcommand on any log (`--nats`; seek and delete on a
/// file).
pub(crate) fn run_log<L: EventLog>(log: &L, cmd: Command, out: &mut Out) -> Result {
    match cmd {
        Command::List => out.list(&COLUMNS, &log.cursors()?)?,
        Command::Show { name } => {
            let cursor = log.cursor(&name)?;
            let dead = log.dead_letters(&name)?;
            out.record(&Shown {
                cursor,
                dead_letter_events: dead,
            })?;
        }
        Command::Seek {
            name,
            to,
            to_seq,
            beginning,
            end,
        } => {
            let position = match (to, to_seq, beginning, end) {
                (Some(t), ..) => Position::Time(t),
                (_, Some(s), ..) => Position::Seq(s),
                (_, _, true, _) => Position::Beginning,
                _ => Position::End,
            };
            out.record(&log.seek(&name, position)?)?;
        }
        Command::Delete { name } => {
            log.delete_cursor(&name)?;
            out.record(&serde_json::json!({ "deleted": name }))?;
        }
    }
    Ok(())
}
