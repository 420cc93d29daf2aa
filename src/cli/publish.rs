//! `ctrlbus publish`: one event from flags, or JSON lines from a file or
//! standard input, all or nothing.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use ctrlbus::{
    Bus, DEFAULT_MAX_PAYLOAD_BYTES, DurableBus, Event, EventId, Filter, InstanceId, Position, Type,
};
use jiff::Timestamp;
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::{CliError, Result};
use super::output::Out;
use super::{open, progress, values};

/// Events per atomic batch when publishing a file.
const BATCH: usize = 4096;

/// `publish` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  ctrlbus publish deploy.started --tenant acme --actor alice --payload '{\"version\":\"v2\"}'
  ctrlbus publish --file events.jsonl
  ctrlbus --db old.redb replay --tenant acme | ctrlbus --db new.redb publish --file -

A file holds one event per line, as `replay` prints them; `id` and `timestamp`
are optional (a new id, and now). Every line is checked before anything is
written: one bad line fails the whole file, naming its line number, unless
--skip-invalid is given.")]
pub(crate) struct Args {
    /// The event type (`deploy.started`).
    #[arg(value_name = "TYPE", value_parser = values::event_type,
          required_unless_present = "file")]
    event_type: Option<Type>,
    /// The tenant.
    #[arg(long, value_name = "T", required_unless_present = "file")]
    tenant: Option<String>,
    /// The instance (`inst_…`).
    #[arg(long, value_name = "ID", value_parser = values::instance)]
    instance: Option<InstanceId>,
    /// Who did it.
    #[arg(long, value_name = "A")]
    actor: Option<String>,
    /// The payload, a JSON object.
    #[arg(long, value_name = "JSON", value_parser = values::payload)]
    payload: Option<Map<String, Value>>,
    /// The event id (`evt_…`; default: a new one). Publishing an id already
    /// in the log returns the stored event and writes nothing.
    #[arg(long, value_name = "ID", value_parser = values::event_id)]
    id: Option<EventId>,
    /// The event's timestamp (default: now).
    #[arg(long, value_name = "TIME", value_parser = values::time)]
    timestamp: Option<Timestamp>,
    /// Publish the JSON lines of PATH (`-` for standard input) instead.
    #[arg(long, value_name = "PATH",
          conflicts_with_all = ["event_type", "tenant", "instance", "actor", "payload", "id", "timestamp"])]
    file: Option<PathBuf>,
    /// With --file: skip bad lines (reported on standard error) instead of
    /// failing.
    #[arg(long, requires = "file")]
    skip_invalid: bool,
}

/// Runs `publish`.
pub(crate) fn run(db: &Path, args: Args, out: &mut Out) -> Result {
    if let Some(file) = &args.file {
        return publish_file(db, file, args.skip_invalid, out);
    }
    let (Some(ty), Some(tenant)) = (args.event_type, args.tenant) else {
        return Err(CliError::Usage(
            "publish needs TYPE and --tenant, or --file".into(),
        ));
    };
    let mut event = Event::new(ty, tenant);
    if let Some(i) = args.instance {
        event = event.with_instance(i);
    }
    if let Some(a) = args.actor {
        event = event.with_actor(a);
    }
    if let Some(p) = args.payload {
        event = event.with_payload(p);
    }
    if let Some(id) = args.id {
        event = event.with_id(id);
    }
    if let Some(t) = args.timestamp {
        event = event.with_timestamp(t);
    }
    event
        .check_payload_size(DEFAULT_MAX_PAYLOAD_BYTES)
        .map_err(|e| CliError::Usage(format!("--payload: {e}")))?;
    let bus = open::writable(db, true)?;
    let receipt = bus.publish(event)?;
    // Print what the log holds (for a duplicate id: the original event).
    let stored = bus
        .read(Position::Seq(receipt.seq), &Filter::all())?
        .next()
        .transpose()?
        .ok_or_else(|| CliError::msg(format!("event {} vanished from the log", receipt.id)))?;
    bus.close();
    out.events(&[stored])?;
    Ok(())
}

/// Where JSON lines come from: a file (read twice: check, then publish) or
/// standard input (held in memory).
enum Source {
    File(PathBuf),
    Stdin(Vec<u8>),
}

impl Source {
    fn open(path: &Path) -> Result<Source> {
        if path == Path::new("-") {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            return Ok(Source::Stdin(buf));
        }
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => {
                Err(CliError::msg(format!("{}: is a directory", path.display())))
            }
            Ok(_) => Ok(Source::File(path.to_path_buf())),
            Err(e) => Err(CliError::msg(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Stdin(_) => "<stdin>".into(),
        }
    }

    fn len(&self) -> u64 {
        match self {
            Source::File(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            Source::Stdin(b) => b.len() as u64,
        }
    }

    fn reader(&self) -> Result<Box<dyn BufRead + '_>> {
        Ok(match self {
            Source::File(p) => Box::new(BufReader::with_capacity(
                1 << 16,
                File::open(p)
                    .map_err(|e| CliError::msg(format!("cannot read {}: {e}", p.display())))?,
            )),
            Source::Stdin(b) => Box::new(&b[..]),
        })
    }

    /// Calls `f(line_number, line, bytes_read_so_far)` for every non-blank
    /// line.
    fn for_each_line(&self, mut f: impl FnMut(u64, &[u8], u64) -> Result) -> Result {
        let mut reader = self.reader()?;
        let mut line = Vec::new();
        let (mut number, mut offset) = (0u64, 0u64);
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| CliError::msg(format!("cannot read {}: {e}", self.name())))?;
            if n == 0 {
                return Ok(());
            }
            number += 1;
            offset += n as u64;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            f(number, &line, offset)?;
        }
    }
}

/// Parses one line into an event, filling in a missing id and timestamp.
pub(crate) fn parse_line(line: &[u8], now: Timestamp) -> std::result::Result<Event, String> {
    let mut map: Map<String, Value> = match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err("not a JSON object".into()),
        Err(e) => return Err(format!("invalid JSON: {e}")),
    };
    if !map.contains_key("id") {
        map.insert("id".into(), Value::String(EventId::new().to_string()));
    }
    if !map.contains_key("timestamp") {
        map.insert("timestamp".into(), Value::String(now.to_string()));
    }
    let bytes = serde_json::to_vec(&map).map_err(|e| e.to_string())?;
    let event = Event::from_json(&bytes).map_err(|e| e.to_string())?;
    event
        .check_payload_size(DEFAULT_MAX_PAYLOAD_BYTES)
        .map_err(|e| e.to_string())?;
    Ok(event)
}

/// The summary line of `publish --file`.
#[derive(Debug, Default, Serialize)]
struct Summary {
    /// Events written.
    published: u64,
    /// Events whose id was already in the log, or repeated in the file.
    duplicates: u64,
    /// Bad lines skipped (with --skip-invalid).
    skipped: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seq: Option<u64>,
}

fn publish_file(db: &Path, path: &Path, skip_invalid: bool, out: &mut Out) -> Result {
    let source = Source::open(path)?;
    let name = source.name();
    let now = Timestamp::now();
    let mut summary = Summary::default();

    // Pass 1: check every line before writing anything.
    let pb = progress::bar(source.len(), "checking");
    let mut bad_lines = HashSet::new();
    source.for_each_line(|number, line, offset| {
        pb.set_position(offset);
        if let Err(e) = parse_line(line, now) {
            if !skip_invalid {
                return Err(CliError::msg(format!(
                    "{name} line {number}: {e}; nothing was published"
                )));
            }
            pb.suspend(|| eprintln!("ctrlbus: {name} line {number}: skipped: {e}"));
            bad_lines.insert(number);
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    summary.skipped = bad_lines.len() as u64;

    // Pass 2: publish in atomic batches.
    let bus = open::writable(db, true)?;
    let pb = progress::bar(source.len(), "publishing");
    let mut seen = HashSet::new();
    let mut batch = Vec::with_capacity(BATCH);
    let mut last_line = 0;
    let result = source.for_each_line(|number, line, offset| {
        pb.set_position(offset);
        if bad_lines.contains(&number) {
            return Ok(());
        }
        let event = parse_line(line, now).map_err(|e| {
            CliError::msg(format!(
                "{name} line {number}: {e} (changed while reading?)"
            ))
        })?;
        if !seen.insert(event.id) {
            summary.duplicates += 1;
            return Ok(());
        }
        batch.push(event);
        last_line = number;
        if batch.len() >= BATCH {
            flush(&bus, &mut batch, &mut summary)?;
        }
        Ok(())
    });
    let result = result.and_then(|()| flush(&bus, &mut batch, &mut summary));
    pb.finish_and_clear();
    bus.close();
    if let Err(e) = result {
        let done = if summary.published + summary.duplicates > 0 {
            format!(
                " ({} events before line {last_line} were already committed)",
                summary.published
            )
        } else {
            " (nothing was published)".to_owned()
        };
        return Err(match e {
            CliError::Runtime(m) => CliError::Runtime(format!("{m}{done}")),
            other => other,
        });
    }
    out.record(&summary)?;
    Ok(())
}

fn flush(bus: &DurableBus, batch: &mut Vec<Event>, summary: &mut Summary) -> Result {
    if batch.is_empty() {
        return Ok(());
    }
    let receipts = bus.publish_batch(std::mem::take(batch))?;
    for r in receipts {
        if r.duplicate {
            summary.duplicates += 1;
        } else {
            summary.published += 1;
            summary.first_seq.get_or_insert(r.seq);
            summary.last_seq = Some(r.seq);
        }
    }
    Ok(())
}
