//! `ctrlbus replay` and `ctrlbus tail`: reading the log, read-only, while
//! another process may be writing it.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use ctrlbus::{Filter, LogEntry, LogReader, Position, ReadOnlyLog};
use jiff::Timestamp;

use super::error::Result;
use super::filter_args::FilterArgs;
use super::output::Out;
use super::{open, progress, values};

/// Bytes of output gathered before each write.
const CHUNK: usize = 1 << 16;

/// `replay` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  ctrlbus replay --since 15m --type 'deploy.*' --tenant acme
  ctrlbus replay --since 2026-01-02T00:00:00Z --until 2026-01-03T00:00:00Z > day.jsonl
  ctrlbus replay --from-seq 1000 --limit 10 | jq .type

Each line is an event's JSON envelope (a webhook body) plus its \"seq\".
--since and --until compare with the time the event was appended.")]
pub(crate) struct ReplayArgs {
    /// From the first event appended at or after TIME (RFC 3339, or a span
    /// back from now such as 15m).
    #[arg(long, value_name = "TIME", value_parser = values::time, conflicts_with = "from_seq")]
    since: Option<Timestamp>,
    /// Stop at the first event appended after TIME.
    #[arg(long, value_name = "TIME", value_parser = values::time)]
    until: Option<Timestamp>,
    /// From the event with this sequence number.
    #[arg(long, value_name = "N")]
    from_seq: Option<u64>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Print at most N events.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
}

/// Runs `replay`.
pub(crate) fn replay(db: &Path, args: ReplayArgs, out: &mut Out) -> Result {
    let log = open::read_only(db)?;
    let from = start_of(&args);
    let mut reader = log.read(from, &args.filter.filter())?;
    if let Some(t) = args.until {
        reader = reader.until(t);
    }
    let limit = args.limit.unwrap_or(u64::MAX);
    if out.table() {
        let mut entries = Vec::new();
        for e in reader {
            if entries.len() as u64 >= limit {
                break;
            }
            entries.push(e?);
        }
        out.events(&entries)?;
        return Ok(());
    }
    // A progress bar only when the output goes elsewhere than the terminal.
    let pb = if std::io::stdout().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let start = reader.next_seq();
        let last = log.stats()?.last_seq;
        let pb = progress::bar(last.saturating_add(1).saturating_sub(start), "replaying");
        pb.set_position(0);
        pb.set_length(last.saturating_add(1).saturating_sub(start));
        pb
    };
    let start = reader.next_seq();
    let result = write_all(&mut reader, limit, out, |r| {
        pb.set_position(r.next_seq() - start);
    });
    pb.finish_and_clear();
    result.map(drop)
}

/// Writes up to `limit` events of `reader` as JSON lines.
fn write_all(
    reader: &mut LogReader,
    limit: u64,
    out: &mut Out,
    mut tick: impl FnMut(&LogReader),
) -> Result<u64> {
    let mut buf = Vec::with_capacity(CHUNK + 4096);
    let mut n = 0u64;
    while n < limit {
        match reader.write_next_json(&mut buf) {
            None => break,
            Some(Ok(_)) => n += 1,
            Some(Err(e)) => {
                out.raw(&buf)?;
                out.flush()?;
                return Err(e.into());
            }
        }
        if buf.len() >= CHUNK {
            out.raw(&buf)?;
            buf.clear();
            tick(reader);
        }
    }
    out.raw(&buf)?;
    Ok(n)
}

/// `tail` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  ctrlbus tail -n 20 --tenant acme
  ctrlbus tail --follow --type 'health.*'")]
pub(crate) struct TailArgs {
    /// How many of the newest matching events to print.
    #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 10)]
    lines: usize,
    /// Keep printing new events as they are appended (until interrupted).
    #[arg(short, long)]
    follow: bool,
    /// With --follow: how often to look for new events.
    #[arg(long, value_name = "DUR", value_parser = values::duration, default_value = "200ms")]
    interval: Duration,
    #[command(flatten)]
    filter: FilterArgs,
}

/// Runs `tail`.
pub(crate) fn tail(db: &Path, args: TailArgs, out: &mut Out) -> Result {
    let log = open::read_only(db)?;
    let filter = args.filter.filter();
    let (entries, mut next) = last_n(&log, &filter, args.lines)?;
    out.events(&entries)?;
    out.flush()?;
    if !args.follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(args.interval);
        let mut reader = log.read(Position::Seq(next), &filter)?;
        if out.table() {
            let entries = reader
                .by_ref()
                .collect::<std::result::Result<Vec<_>, _>>()?;
            out.events(&entries)?;
        } else {
            write_all(&mut reader, u64::MAX, out, |_| {})?;
        }
        next = next.max(reader.next_seq());
        out.flush()?;
    }
}

/// The newest `n` events matching `filter`, oldest first, and the `seq` a
/// follower should read from next. Reads backwards in growing windows, so a
/// selective filter does not cost a scan of the whole log unless it must.
fn last_n(log: &ReadOnlyLog, filter: &Filter, n: usize) -> Result<(Vec<LogEntry>, u64)> {
    let stats = log.stats()?;
    let end = stats.last_seq;
    if stats.events == 0 || n == 0 {
        return Ok((Vec::new(), end + 1));
    }
    let first = stats.first_seq;
    let mut window = if filter.is_all() {
        n as u64
    } else {
        (n as u64).max(256)
    };
    loop {
        let start = end.saturating_sub(window.saturating_sub(1)).max(first);
        let mut ring = VecDeque::with_capacity(n + 1);
        for e in log.read(Position::Seq(start), filter)? {
            let e = e?;
            if e.seq > end {
                break;
            }
            ring.push_back(e);
            if ring.len() > n {
                ring.pop_front();
            }
        }
        if ring.len() >= n || start <= first {
            return Ok((ring.into(), end + 1));
        }
        window = window.saturating_mul(4);
    }
}

/// Where `replay` starts.
fn start_of(args: &ReplayArgs) -> Position {
    match (args.from_seq, args.since) {
        (Some(seq), _) => Position::Seq(seq),
        (None, Some(t)) => Position::Time(t),
        (None, None) => Position::Beginning,
    }
}

/// Runs `replay` on any log (`--nats`): the same output as on a file.
pub(crate) fn replay_log<L: ctrlbus::EventLog>(log: &L, args: ReplayArgs, out: &mut Out) -> Result {
    let limit = args.limit.unwrap_or(u64::MAX);
    let mut entries = Vec::new();
    for (n, e) in log
        .read(start_of(&args), &args.filter.filter())?
        .enumerate()
    {
        let e = e?;
        if n as u64 >= limit || args.until.is_some_and(|u| e.appended_at > u) {
            break;
        }
        entries.push(e);
        if entries.len() >= 1024 && !out.table() {
            out.events(&entries)?;
            entries.clear();
        }
    }
    out.events(&entries)?;
    Ok(())
}

/// Runs `tail` on any log (`--nats`).
pub(crate) fn tail_log<L: ctrlbus::EventLog>(log: &L, args: TailArgs, out: &mut Out) -> Result {
    let filter = args.filter.filter();
    let recent = log.recent_events(args.lines, &filter)?;
    let mut next = log.last_seq()? + 1;
    let shown: Vec<LogEntry> = if recent.is_empty() {
        Vec::new()
    } else {
        // Their seqs and append times, from the log.
        let ids: std::collections::HashSet<_> = recent.iter().map(|e| e.id).collect();
        let from = next.saturating_sub(recent.len() as u64 * 4 + 1024).max(1);
        log.read(Position::Seq(from), &filter)?
            .filter_map(std::result::Result::ok)
            .filter(|e| ids.contains(&e.event.id))
            .collect()
    };
    out.events(&shown)?;
    out.flush()?;
    if !args.follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(args.interval);
        let entries: Vec<LogEntry> = log
            .read(Position::Seq(next), &filter)?
            .collect::<std::result::Result<_, _>>()?;
        next = next.max(log.last_seq()? + 1);
        out.events(&entries)?;
        out.flush()?;
    }
}
