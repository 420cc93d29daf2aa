//! The TIME and DUR forms of the command line, as library functions so that
//! tools and fuzz targets share one parser.
//!
//! - DUR: one or more `<digits><unit>` parts, units `ns`, `us` (or `µs`),
//!   `ms`, `s`, `m`, `h`, `d` (24 h), `w` (7 d): `100ms`, `5s`, `2h`, `1h30m`.
//! - TIME: an RFC 3339 instant (`2026-01-02T03:04:05Z`, any offset), or a
//!   DUR read as a span back from now (`30s`, `15m`, `2h`, `7d`).
//!
//! Both parsers reject anything else with a [`TimeError`]; neither panics
//! on any input, and arithmetic that would overflow is an error.

use std::fmt;
use std::time::Duration;

use jiff::Timestamp;

/// Longest input accepted, in bytes: far more than any real TIME or DUR,
/// small enough that parsing stays cheap on hostile input.
const MAX_INPUT_LEN: usize = 256;

/// A TIME or DUR argument failed to parse. Nothing is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeError {
    /// `"TIME"` or `"DUR"`.
    pub kind: &'static str,
    /// The input (cut to its first 64 characters).
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl TimeError {
    fn new(kind: &'static str, input: &str, reason: impl Into<String>) -> TimeError {
        TimeError {
            kind,
            input: input.chars().take(64).collect(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for TimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {:?}: {}", self.kind, self.input, self.reason)
    }
}

impl std::error::Error for TimeError {}

/// Parses a DUR: `100ms`, `5s`, `15m`, `2h`, `7d`, `1w`, or several parts
/// such as `1h30m`.
///
/// # Errors
/// [`TimeError`] for an empty input, a number without a unit, an unknown
/// unit, or a total beyond `u64::MAX` seconds.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(ctrlbus::parse_duration("1h30m")?, Duration::from_secs(5400));
/// assert_eq!(ctrlbus::parse_duration("100ms")?, Duration::from_millis(100));
/// assert!(ctrlbus::parse_duration("5").is_err());
/// # Ok::<(), ctrlbus::TimeError>(())
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, TimeError> {
    parse_dur(s, "DUR")
}

fn parse_dur(s: &str, kind: &'static str) -> Result<Duration, TimeError> {
    const HINT: &str =
        "expected a number and a unit (ns, us, ms, s, m, h, d, w), like 100ms, 5s, 2h or 1h30m";
    if s.is_empty() {
        return Err(TimeError::new(kind, s, format!("empty; {HINT}")));
    }
    if s.len() > MAX_INPUT_LEN {
        return Err(TimeError::new(kind, s, "too long"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(TimeError::new(kind, s, HINT));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| TimeError::new(kind, s, "number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit())
            .map_or(rest.len(), |(i, _)| i);
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ns" => Some(Duration::from_nanos(number)),
            "us" | "µs" => Some(Duration::from_micros(number)),
            "ms" => Some(Duration::from_millis(number)),
            "s" => Some(Duration::from_secs(number)),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            "h" => number.checked_mul(3600).map(Duration::from_secs),
            "d" => number.checked_mul(86_400).map(Duration::from_secs),
            "w" => number.checked_mul(604_800).map(Duration::from_secs),
            "" => return Err(TimeError::new(kind, s, format!("missing unit; {HINT}"))),
            other => {
                return Err(TimeError::new(
                    kind,
                    s,
                    format!("unknown unit {other:?}; {HINT}"),
                ));
            }
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(|| TimeError::new(kind, s, "too large"))?;
    }
    Ok(total)
}

/// Parses a TIME: an RFC 3339 instant, or a DUR meaning that long before
/// now (`15m` is fifteen minutes ago).
///
/// # Errors
/// [`TimeError`] when the input is neither, or the span reaches before the
/// earliest representable instant.
///
/// ```
/// let t = ctrlbus::parse_time("2026-01-02T03:04:05Z")?;
/// assert_eq!(t.to_string(), "2026-01-02T03:04:05Z");
/// let ago = ctrlbus::parse_time("15m")?;
/// assert!(ago < jiff::Timestamp::now());
/// # Ok::<(), ctrlbus::TimeError>(())
/// ```
pub fn parse_time(s: &str) -> Result<Timestamp, TimeError> {
    parse_time_at(s, Timestamp::now())
}

/// [`parse_time`] with an explicit "now" (for tests and reproducible tools).
///
/// # Errors
/// As [`parse_time`].
pub fn parse_time_at(s: &str, now: Timestamp) -> Result<Timestamp, TimeError> {
    const HINT: &str = "expected an RFC 3339 time (2026-01-02T03:04:05Z) or a span back from now (30s, 15m, 2h, 7d)";
    if s.is_empty() {
        return Err(TimeError::new("TIME", s, format!("empty; {HINT}")));
    }
    if s.len() > MAX_INPUT_LEN {
        return Err(TimeError::new("TIME", s, "too long"));
    }
    // A span starts with a digit and has no date separators.
    let looks_like_span = s.as_bytes()[0].is_ascii_digit() && !s.contains(['-', ':', 'T']);
    if looks_like_span {
        let span = parse_dur(s, "TIME").map_err(|e| TimeError::new("TIME", s, e.reason))?;
        let span = jiff::SignedDuration::try_from(span)
            .map_err(|_| TimeError::new("TIME", s, "span too large"))?;
        return now
            .checked_sub(span)
            .map_err(|_| TimeError::new("TIME", s, "span reaches before the earliest time"));
    }
    s.parse::<Timestamp>()
        .map_err(|_| TimeError::new("TIME", s, HINT))
}

/// An instant as stored: unix nanoseconds, clamped to `i64` (good until
/// the year 2262).
pub(crate) fn ns(t: Timestamp) -> i64 {
    t.as_nanosecond()
        .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// Now, as stored (see [`ns`]).
pub(crate) fn now_ns() -> i64 {
    ns(Timestamp::now())
}

/// A stored instant back as a timestamp.
pub(crate) fn ts(ns: i64) -> Timestamp {
    Timestamp::from_nanosecond(i128::from(ns)).unwrap_or(Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("100ms", Duration::from_millis(100)),
            ("5s", Duration::from_secs(5)),
            ("15m", Duration::from_secs(900)),
            ("2h", Duration::from_secs(7200)),
            ("7d", Duration::from_secs(7 * 86_400)),
            ("1w", Duration::from_secs(604_800)),
            ("1h30m", Duration::from_secs(5400)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("10ns", Duration::from_nanos(10)),
            ("0s", Duration::ZERO),
        ];
        for (s, d) in ok {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
    }

    #[test]
    fn bad_durations() {
        for s in [
            "",
            "5",
            "s",
            "5x",
            "-5s",
            "5 s",
            " 5s",
            "5s ",
            "1.5s",
            "h1",
            "5sec",
            "5S",
            "99999999999999999999s",
            "18446744073709551615w",
        ] {
            let e = parse_duration(s).unwrap_err();
            assert_eq!(e.kind, "DUR");
            assert!(e.to_string().starts_with("invalid DUR"), "{e}");
        }
        assert!(
            parse_duration("5")
                .unwrap_err()
                .reason
                .contains("missing unit")
        );
        assert!(
            parse_duration("5x")
                .unwrap_err()
                .reason
                .contains("unknown unit")
        );
        assert!(parse_duration(&"1s".repeat(200)).is_err());
    }

    #[test]
    fn times() {
        let now: Timestamp = "2026-03-01T12:00:00Z".parse().unwrap();
        assert_eq!(
            parse_time_at("15m", now).unwrap(),
            "2026-03-01T11:45:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            parse_time_at("7d", now).unwrap(),
            "2026-02-22T12:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(parse_time_at("0s", now).unwrap(), now);
        assert_eq!(
            parse_time_at("2026-01-02T03:04:05+01:00", now).unwrap(),
            "2026-01-02T02:04:05Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            parse_time_at("2026-01-02T03:04:05.123456789Z", now)
                .unwrap()
                .subsec_nanosecond(),
            123_456_789
        );
    }

    #[test]
    fn bad_times() {
        let now = Timestamp::now();
        for s in [
            "",
            "yesterday",
            "15",
            "15x",
            "2026-01-02",
            "2026-13-02T00:00:00Z",
            "-5m",
            "2026-01-02T03:04:05",
            "99999999d",
            "1000000w",
        ] {
            let e = parse_time_at(s, now).unwrap_err();
            assert_eq!(e.kind, "TIME", "{s}");
            assert!(e.to_string().starts_with("invalid TIME"), "{e}");
        }
    }

    #[test]
    fn no_panic_on_odd_input() {
        for s in ["µ", "1µ", "9µs9", "\u{0}", "1\u{301}s", "٣s", "1s\n"] {
            let _ = parse_duration(s);
            let _ = parse_time(s);
        }
    }
}
