//! What an event may hold, checked before anything is written, so that
//! every event a bus accepts can be read back by every reader (G11): the
//! log's own decoder, a JSON-lines re-import, and a Go `ctrlplane` receiver
//! decoding a webhook body into its types.
//!
//! - Field lengths: `tenant_id` and `actor_id` at most [`MAX_TENANT_LEN`]
//!   and [`MAX_ACTOR_LEN`] bytes (the payload has its own, configurable
//!   limit), so an event's whole encoding is bounded.
//! - Nesting: the whole envelope at most [`MAX_JSON_DEPTH`] levels of
//!   objects and arrays (the envelope object is level 1, the payload object
//!   level 2), well inside `serde_json`'s parse limit of 128 that readers
//!   hit.
//! - Times: years 0000–9999 (what Go's `time.Time` marshals and parses as
//!   RFC 3339), and no leap second (`:60`), which jiff would silently read
//!   as `:59`.
//! - Numbers: an integer literal outside `i64`/`u64` is refused rather than
//!   silently rounded to a float (`serde_json` without
//!   `arbitrary_precision` reads `123456789012345678901234567890` as
//!   `1.2345678901234568e29`).

use jiff::Timestamp;
use serde_json::Value;

use crate::error::EventError;

/// Longest `tenant_id`, in bytes (the same limit as a webhook's tenant).
pub const MAX_TENANT_LEN: usize = 256;
/// Longest `actor_id`, in bytes.
pub const MAX_ACTOR_LEN: usize = 256;
/// Deepest nesting of objects and arrays in an event's JSON, counting the
/// envelope object as 1 and the payload object as 2.
pub const MAX_JSON_DEPTH: usize = 64;

/// The earliest timestamp an event may carry: 0000-01-01T00:00:00Z.
pub(crate) fn earliest() -> Timestamp {
    // -62167219200 s is 0000-01-01T00:00:00Z; always in jiff's range.
    Timestamp::from_second(-62_167_219_200).unwrap_or(Timestamp::MIN)
}

/// The latest timestamp an event may carry: jiff's last instant,
/// 9999-12-30T22:00:00.999999999Z (jiff keeps every instant that is in
/// year 9999 or earlier in all time zones).
pub(crate) fn latest() -> Timestamp {
    Timestamp::MAX
}

/// Checks a timestamp is in years 0000–9999.
///
/// # Errors
/// [`EventError::Timestamp`] naming the range.
pub(crate) fn check_timestamp(t: Timestamp) -> Result<(), EventError> {
    if t < earliest() || t > latest() {
        return Err(EventError::Timestamp(format!(
            "timestamp {t} is outside years 0000-9999 (what RFC 3339 and Go's time.Time can carry)"
        )));
    }
    Ok(())
}

/// Refuses a leap second in an RFC 3339 string (`…T23:59:60Z`): the
/// seconds field is the two digits after the second `:` of the time part.
///
/// # Errors
/// [`EventError::Timestamp`].
pub(crate) fn check_no_leap_second(s: &str) -> Result<(), EventError> {
    let Some(t) = s.find(['T', 't', ' ']) else {
        return Ok(());
    };
    let time = s.as_bytes().get(t + 1..).unwrap_or_default();
    if time.len() >= 8 && time[2] == b':' && time[5] == b':' && &time[6..8] == b"60" {
        return Err(EventError::Timestamp(format!(
            "{s:?} is a leap second, which can't be stored exactly; use :59.999999999"
        )));
    }
    Ok(())
}

/// Checks the nesting depth of `payload` as an event's payload object
/// (level 2). Iterative: a value nested deeper than the stack allows is
/// refused, not a crash.
///
/// # Errors
/// [`EventError::TooDeep`].
pub(crate) fn check_payload_depth<'a>(
    payload: impl Iterator<Item = &'a Value>,
) -> Result<(), EventError> {
    // (value, its depth); the payload's own values are at depth 3. A flat
    // payload (no nested object or array) allocates nothing.
    let mut stack: Vec<(&Value, usize)> = Vec::new();
    for v in payload {
        if matches!(v, Value::Array(_) | Value::Object(_)) {
            stack.push((v, 3));
        }
    }
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        if depth > MAX_JSON_DEPTH {
            return Err(EventError::TooDeep {
                limit: MAX_JSON_DEPTH,
            });
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    Ok(())
}

/// Checks the length of `tenant_id` and `actor_id`.
///
/// # Errors
/// [`EventError::FieldTooLong`].
pub(crate) fn check_field_lengths(tenant_id: &str, actor_id: &str) -> Result<(), EventError> {
    for (field, value, limit) in [
        ("tenant_id", tenant_id, MAX_TENANT_LEN),
        ("actor_id", actor_id, MAX_ACTOR_LEN),
    ] {
        if value.len() > limit {
            return Err(EventError::FieldTooLong { field, limit });
        }
    }
    Ok(())
}

/// Scans JSON text for nesting beyond [`MAX_JSON_DEPTH`] and for integer
/// literals outside `i64`/`u64`, before it is parsed: both would otherwise
/// be lost in parsing (the parser's recursion limit, or rounding to a
/// float). `base_depth` is the level of the text's outer value (1 for an
/// envelope, 2 for a payload object). Strings are skipped with their
/// escapes; the text need not be valid JSON (the parser judges that).
///
/// # Errors
/// [`EventError::TooDeep`] or [`EventError::NumberOutOfRange`].
pub(crate) fn scan_json(text: &[u8], base_depth: usize) -> Result<(), EventError> {
    let mut depth = base_depth - 1;
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => {
                i += 1;
                while i < text.len() && text[i] != b'"' {
                    i += if text[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(EventError::TooDeep {
                        limit: MAX_JSON_DEPTH,
                    });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i + 1 < text.len()
                    && matches!(text[i + 1], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let token = &text[start..=i];
                let integer = !token.iter().any(|c| matches!(c, b'.' | b'e' | b'E'));
                if integer {
                    let s = std::str::from_utf8(token).unwrap_or_default();
                    if s.parse::<i64>().is_err() && s.parse::<u64>().is_err() && s != "-" {
                        return Err(EventError::NumberOutOfRange(s.to_owned()));
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn depth_limit_and_one_past_it() {
        // A payload object (level 2) holding arrays down to level 64.
        let at_limit = format!("{{\"k\":{}}}", nested(MAX_JSON_DEPTH - 2));
        assert!(scan_json(at_limit.as_bytes(), 2).is_ok());
        let value: Value = serde_json::from_str(&at_limit).unwrap();
        let map = value.as_object().unwrap();
        assert!(check_payload_depth(map.values()).is_ok());

        let past = format!("{{\"k\":{}}}", nested(MAX_JSON_DEPTH - 1));
        assert_eq!(
            scan_json(past.as_bytes(), 2),
            Err(EventError::TooDeep {
                limit: MAX_JSON_DEPTH
            })
        );
        let value: Value = serde_json::from_str(&past).unwrap();
        let map = value.as_object().unwrap();
        assert!(matches!(
            check_payload_depth(map.values()),
            Err(EventError::TooDeep { .. })
        ));
    }

    #[test]
    fn brackets_in_strings_do_not_count() {
        let text = format!(r#"{{"k":"{}\"{}"}}"#, "[".repeat(200), "{".repeat(200));
        assert!(scan_json(text.as_bytes(), 2).is_ok());
    }

    #[test]
    fn integers_beyond_64_bits_are_refused() {
        for ok in [
            "{\"a\":9223372036854775807}",
            "{\"a\":-9223372036854775808}",
            "{\"a\":18446744073709551615}",
            "{\"a\":1.5e300}",
            "{\"a\":123456789012345678901234567890.0}",
            "{\"a\":\"123456789012345678901234567890\"}",
        ] {
            assert!(scan_json(ok.as_bytes(), 2).is_ok(), "{ok}");
        }
        for bad in [
            "{\"a\":18446744073709551616}",
            "{\"a\":-9223372036854775809}",
            "{\"a\":[1,123456789012345678901234567890]}",
        ] {
            assert!(
                matches!(
                    scan_json(bad.as_bytes(), 2),
                    Err(EventError::NumberOutOfRange(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn years_and_leap_seconds() {
        assert!(check_timestamp(earliest()).is_ok());
        assert!(check_timestamp(latest()).is_ok());
        assert_eq!(earliest().to_string(), "0000-01-01T00:00:00Z");
        assert_eq!(latest().to_string(), "9999-12-30T22:00:00.999999999Z");
        let before = earliest() - jiff::SignedDuration::from_nanos(1);
        assert!(check_timestamp(before).is_err());
        assert!(check_no_leap_second("2016-12-31T23:59:60Z").is_err());
        assert!(check_no_leap_second("2016-12-31t23:59:60.5+00:00").is_err());
        assert!(check_no_leap_second("2016-12-31T23:59:59Z").is_ok());
        assert!(check_no_leap_second("2016-12-31T23:60:00Z").is_ok());
    }

    #[test]
    fn field_lengths_at_and_past_the_limit() {
        let at = "t".repeat(MAX_TENANT_LEN);
        assert!(check_field_lengths(&at, &"a".repeat(MAX_ACTOR_LEN)).is_ok());
        assert_eq!(
            check_field_lengths(&format!("{at}t"), ""),
            Err(EventError::FieldTooLong {
                field: "tenant_id",
                limit: MAX_TENANT_LEN
            })
        );
        assert_eq!(
            check_field_lengths("", &"a".repeat(MAX_ACTOR_LEN + 1)),
            Err(EventError::FieldTooLong {
                field: "actor_id",
                limit: MAX_ACTOR_LEN
            })
        );
    }
}
