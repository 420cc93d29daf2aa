//! Writing results: JSON lines by default, aligned tables with
//! `--format table`. Everything goes through [`Out`] so that a closed pipe
//! surfaces as an error the caller turns into a quiet exit.

use std::fmt::Write as _;
use std::io::{self, BufWriter, Stdout, Write};

use ctrlbus::LogEntry;
use serde::Serialize;
use serde_json::Value;

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// One JSON object per line (for `jq` and scripts).
    Json,
    /// Aligned columns (for people).
    Table,
}

/// Buffered standard output in the chosen format.
pub(crate) struct Out {
    w: BufWriter<Stdout>,
    pub(crate) format: Format,
}

impl Out {
    /// Standard output in `format`.
    pub(crate) fn new(format: Format) -> Out {
        Out {
            w: BufWriter::with_capacity(1 << 16, io::stdout()),
            format,
        }
    }

    /// True for `--format table`.
    pub(crate) fn table(&self) -> bool {
        self.format == Format::Table
    }

    /// Writes bytes as they are.
    pub(crate) fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes)
    }

    /// Writes one value as one JSON line, whatever the format.
    pub(crate) fn json_line<T: Serialize + ?Sized>(&mut self, v: &T) -> io::Result<()> {
        serde_json::to_writer(&mut self.w, v).map_err(io::Error::other)?;
        self.w.write_all(b"\n")
    }

    /// One object: a JSON line, or a two-column table of its fields.
    pub(crate) fn record<T: Serialize + ?Sized>(&mut self, v: &T) -> io::Result<()> {
        if !self.table() {
            return self.json_line(v);
        }
        let value = serde_json::to_value(v).map_err(io::Error::other)?;
        let rows: Vec<Vec<String>> = match &value {
            Value::Object(map) => map.iter().map(|(k, v)| vec![k.clone(), cell(v)]).collect(),
            other => vec![vec![cell(other)]],
        };
        self.write_table(&[], &rows)
    }

    /// A list of objects: one JSON line each, or a table with `columns`
    /// (header, JSON field) in that order.
    pub(crate) fn list<T: Serialize>(
        &mut self,
        columns: &[(&str, &str)],
        items: &[T],
    ) -> io::Result<()> {
        if !self.table() {
            for item in items {
                self.json_line(item)?;
            }
            return Ok(());
        }
        let mut rows = Vec::with_capacity(items.len());
        for item in items {
            let value = serde_json::to_value(item).map_err(io::Error::other)?;
            rows.push(
                columns
                    .iter()
                    .map(|(_, field)| value.get(field).map(cell).unwrap_or_default())
                    .collect(),
            );
        }
        let headers: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
        self.write_table(&headers, &rows)
    }

    /// Events: their replay lines, or a table.
    pub(crate) fn events(&mut self, entries: &[LogEntry]) -> io::Result<()> {
        if !self.table() {
            for e in entries {
                self.w.write_all(e.to_json().as_bytes())?;
                self.w.write_all(b"\n")?;
            }
            return Ok(());
        }
        let rows: Vec<Vec<String>> = entries.iter().map(event_row).collect();
        self.write_table(&EVENT_HEADERS, &rows)
    }

    /// Writes an aligned table (no header line when `headers` is empty).
    /// Control characters in cells are written as escapes (see
    /// [`escape_cell`]): a field can't move the cursor, clear the screen,
    /// set the title or forge a row.
    pub(crate) fn write_table(&mut self, headers: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
        let rows: Vec<Vec<String>> = rows
            .iter()
            .map(|r| r.iter().map(|c| escape_cell(c)).collect())
            .collect();
        let rows = &rows;
        let cols = rows
            .iter()
            .map(Vec::len)
            .chain([headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; cols];
        for (i, h) in headers.iter().enumerate() {
            widths[i] = widths[i].max(h.chars().count());
        }
        for row in rows {
            for (i, c) in row.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut line = |cells: &mut dyn Iterator<Item = &str>| -> io::Result<()> {
            let mut s = String::new();
            for (i, c) in cells.enumerate() {
                if i > 0 {
                    s.push_str("  ");
                }
                s.push_str(c);
                if i + 1 < cols {
                    s.extend(std::iter::repeat_n(
                        ' ',
                        widths[i].saturating_sub(c.chars().count()),
                    ));
                }
            }
            self.w.write_all(s.trim_end().as_bytes())?;
            self.w.write_all(b"\n")
        };
        if !headers.is_empty() {
            line(&mut headers.iter().copied())?;
        }
        for row in rows {
            line(&mut row.iter().map(String::as_str))?;
        }
        Ok(())
    }

    /// Flushes to standard output.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// The columns of an event table.
pub(crate) const EVENT_HEADERS: [&str; 8] = [
    "SEQ",
    "TIMESTAMP",
    "TYPE",
    "TENANT",
    "INSTANCE",
    "ACTOR",
    "ID",
    "PAYLOAD",
];

/// One event as a table row.
pub(crate) fn event_row(e: &LogEntry) -> Vec<String> {
    let ev = &e.event;
    vec![
        e.seq.to_string(),
        ev.timestamp.to_string(),
        ev.event_type.to_string(),
        ev.tenant_id.clone(),
        ev.instance_id.map(|i| i.to_string()).unwrap_or_default(),
        ev.actor_id.clone(),
        ev.id.to_string(),
        if ev.payload.is_empty() {
            String::new()
        } else {
            truncate(&serde_json::to_string(&ev.payload).unwrap_or_default(), 60)
        },
    ]
}

/// A cell as it may reach a terminal: C0 and C1 control characters (ESC,
/// newline, carriage return, tab, DEL …) and the Unicode bidirectional
/// overrides become visible `\u{…}` escapes (`\n`, `\r`, `\t` for the
/// common ones, and `\\` for a backslash so that an escape can't be
/// forged); everything else is kept.
pub(crate) fn escape_cell(s: &str) -> String {
    let needs = |c: char| {
        c.is_control()
            || c == '\\'
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(needs) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if needs(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as a table cell: strings bare, the rest as compact JSON.
pub(crate) fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => truncate(&other.to_string(), 80),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::escape_cell;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_cell("alice"), "alice");
        assert_eq!(escape_cell("é ü 日本"), "é ü 日本");
        assert_eq!(escape_cell("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(escape_cell("\x1b]0;pwned\x07"), "\\u{1b}]0;pwned\\u{7}");
        assert_eq!(escape_cell("x\ny\rz\t"), "x\\ny\\rz\\t");
        assert_eq!(escape_cell("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape_cell("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(escape_cell("a\\nb"), "a\\\\nb");
        assert_eq!(escape_cell("\x7f"), "\\u{7f}");
    }
}
