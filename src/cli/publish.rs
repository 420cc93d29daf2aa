//! `ctrlbus publish`: one event from flags, or JSON lines from a file or
//! standard input, all or nothing.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ctrlbus::{
    DEFAULT_MAX_PAYLOAD_BYTES, Event, EventId, EventLog, Filter, InstanceId, Position, Type,
};
use jiff::Timestamp;
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::{CliError, Result};
use super::output::Out;
use super::{progress, values};

/// Events per atomic batch when publishing a file.
const BATCH: usize = 4096;
/// Bytes of JSON lines per atomic batch when publishing a file: with the
/// line limit, this bounds the memory a file of any size takes.
const BATCH_BYTES: usize = 1 << 20;
/// Longest line of `publish --file`: the payload limit plus room for the
/// envelope. A longer line is refused (or skipped) without being held
/// whole in memory.
pub(crate) const MAX_LINE_BYTES: usize = DEFAULT_MAX_PAYLOAD_BYTES + (64 << 10);

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

/// Runs `publish` on the log `open` opens (a redb file, or a JetStream
/// stream with `--nats`), once the input is checked.
pub(crate) fn run<L: EventLog>(
    open: impl FnOnce() -> Result<L>,
    args: Args,
    out: &mut Out,
) -> Result {
    if let Some(file) = &args.file {
        return publish_file(open, file, args.skip_invalid, out);
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
        .validate(DEFAULT_MAX_PAYLOAD_BYTES)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let bus = open()?;
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

/// Where JSON lines come from: a file, read twice (check, then publish),
/// or standard input, copied to an unnamed temporary file (0600, gone when
/// closed) so that memory stays bounded whatever its size.
enum Source {
    File(PathBuf),
    Stdin(File),
}

impl Source {
    fn open(path: &Path) -> Result<Source> {
        if path == Path::new("-") {
            let mut spool = tempfile::tempfile()
                .map_err(|e| CliError::msg(format!("cannot buffer standard input: {e}")))?;
            std::io::copy(&mut std::io::stdin().lock(), &mut spool)
                .map_err(|e| CliError::msg(format!("cannot buffer standard input: {e}")))?;
            return Ok(Source::Stdin(spool));
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
            Source::File(p) => std::fs::metadata(p).map_or(0, |m| m.len()),
            Source::Stdin(f) => f.metadata().map_or(0, |m| m.len()),
        }
    }

    fn reader(&self) -> Result<Box<dyn BufRead + '_>> {
        Ok(match self {
            Source::File(p) => Box::new(BufReader::with_capacity(
                1 << 16,
                File::open(p)
                    .map_err(|e| CliError::msg(format!("cannot read {}: {e}", p.display())))?,
            )),
            Source::Stdin(f) => {
                let mut f = f
                    .try_clone()
                    .map_err(|e| CliError::msg(format!("cannot read standard input: {e}")))?;
                f.seek(SeekFrom::Start(0))
                    .map_err(|e| CliError::msg(format!("cannot read standard input: {e}")))?;
                Box::new(BufReader::with_capacity(1 << 16, f))
            }
        })
    }

    /// Calls `f(line_number, line, bytes_read_so_far)` for every non-blank
    /// line. A line longer than [`MAX_LINE_BYTES`] is handed over cut to
    /// one byte past the limit (the rest is read and dropped), so no line
    /// is held whole in memory.
    fn for_each_line(&self, mut f: impl FnMut(u64, &[u8], u64) -> Result) -> Result {
        let mut reader = self.reader()?;
        let mut line = Vec::new();
        let (mut number, mut offset) = (0u64, 0u64);
        let read_err =
            |e: std::io::Error| CliError::msg(format!("cannot read {}: {e}", self.name()));
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(read_err)?;
            if n == 0 {
                return Ok(());
            }
            number += 1;
            offset += n as u64;
            // Cut short (the limit plus one byte read, no newline yet).
            if line.len() > MAX_LINE_BYTES && line.last() != Some(&b'\n') {
                offset += skip_line(&mut reader).map_err(read_err)?;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            f(number, &line, offset)?;
        }
    }
}

/// Reads and drops the rest of a line, through its newline; the bytes read.
fn skip_line(reader: &mut dyn BufRead) -> std::io::Result<u64> {
    let mut skipped = 0u64;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(skipped);
        }
        let (used, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        reader.consume(used);
        skipped += used as u64;
        if done {
            return Ok(skipped);
        }
    }
}

/// Parses one line into an event, filling in a missing id and timestamp.
pub(crate) fn parse_line(line: &[u8], now: Timestamp) -> std::result::Result<Event, String> {
    // The limit is on the line's content: its end of line does not count.
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_LINE_BYTES {
        return Err(format!(
            "the line is longer than the limit of {MAX_LINE_BYTES} bytes"
        ));
    }
    let event = Event::from_json_or_new(line, now).map_err(|e| match e {
        ctrlbus::EventError::Json(m) => format!("invalid JSON: {m}"),
        other => other.to_string(),
    })?;
    event
        .validate(DEFAULT_MAX_PAYLOAD_BYTES)
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

fn publish_file<L: EventLog>(
    open: impl FnOnce() -> Result<L>,
    path: &Path,
    skip_invalid: bool,
    out: &mut Out,
) -> Result {
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

    // Pass 2: publish in batches (atomic on a redb file).
    let bus = open()?;
    let pb = progress::bar(source.len(), "publishing");
    let mut seen = HashSet::new();
    let mut batch = Vec::with_capacity(BATCH);
    let mut batch_bytes = 0;
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
        batch_bytes += line.len();
        last_line = number;
        if batch.len() >= BATCH || batch_bytes >= BATCH_BYTES {
            flush(&bus, &mut batch, &mut summary)?;
            batch_bytes = 0;
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

fn flush<L: EventLog>(bus: &L, batch: &mut Vec<Event>, summary: &mut Summary) -> Result {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid event line padded with spaces to `len` bytes of content.
    fn line_of(len: usize) -> Vec<u8> {
        let mut line = br#"{"type":"deploy.started","tenant_id":"acme"}"#.to_vec();
        line.resize(len, b' ');
        line.push(b'\n');
        line
    }

    #[test]
    fn a_line_at_the_limit_is_read_and_one_byte_past_it_is_refused() {
        let now = Timestamp::now();
        assert!(parse_line(&line_of(MAX_LINE_BYTES), now).is_ok());
        let mut crlf = line_of(MAX_LINE_BYTES);
        crlf.insert(crlf.len() - 1, b'\r');
        assert!(parse_line(&crlf, now).is_ok(), "a CRLF end of line");
        let err = parse_line(&line_of(MAX_LINE_BYTES + 1), now).unwrap_err();
        assert!(err.contains("longer than the limit"), "{err}");
    }

    #[test]
    fn reading_lines_hands_over_the_limit_whole_and_cuts_what_is_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let mut input = line_of(MAX_LINE_BYTES);
        input.extend(line_of(MAX_LINE_BYTES + 10));
        input.extend(line_of(60));
        std::fs::write(&path, &input).unwrap();
        let mut seen = Vec::new();
        Source::File(path)
            .for_each_line(|number, line, _| {
                seen.push((
                    number,
                    line.len(),
                    parse_line(line, Timestamp::now()).is_ok(),
                ));
                Ok(())
            })
            .unwrap();
        assert_eq!(
            seen,
            vec![
                (1, MAX_LINE_BYTES + 1, true),
                (2, MAX_LINE_BYTES + 1, false),
                (3, 61, true),
            ]
        );
    }
}
