//! Compact JSON of a payload, byte for byte what `serde_json::to_vec`
//! writes, with a faster string escape.
//!
//! Escaping strings was the largest single cost of a publish outside the
//! kernel: `serde_json` looks every byte up in a table (14% of the
//! instructions of `bench publish`, callgrind; BENCHMARKS.md, "Eighth
//! session"). Here a string is scanned 8 bytes at a time for the bytes
//! that need escaping (`"`, `\`, below 0x20), and the runs between are
//! copied whole.
//!
//! Invariant: the output equals `serde_json`'s compact output for every
//! value: the same escapes (`\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`,
//! else `\u00xx` in lowercase hex; 0x7F and non-ASCII as they are), the
//! same key order (the map's), numbers written by `serde_json` itself. The
//! tests compare the two on generated values.

use serde_json::{Map, Value};

/// Appends `map` as compact JSON to `out`.
pub(crate) fn write_object(map: &Map<String, Value>, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(k, out);
        out.push(b':');
        write_value(v, out);
    }
    out.push(b'}');
}

fn write_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        // `serde_json`'s own number formatting; writing to a Vec can't fail.
        Value::Number(n) => {
            let _ = serde_json::to_writer(&mut *out, n);
        }
        Value::String(s) => write_str(s, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(v, out);
            }
            out.push(b']');
        }
        Value::Object(m) => write_object(m, out),
    }
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// A word with the high bit set in the lowest byte of `w` that needs
/// escaping (and maybe in bytes above it: see `zero_bytes`); zero if none
/// does. A byte of 0x80 or more never needs escaping and is masked out.
#[inline]
const fn needs_escape(w: u64) -> u64 {
    let quote = w ^ (LO * b'"' as u64);
    let backslash = w ^ (LO * b'\\' as u64);
    let below_space = w.wrapping_sub(LO * 0x20) & !w & HI;
    (zero_bytes(quote) | zero_bytes(backslash) | below_space) & !w & HI
}

/// The high bit of each zero byte of `x` set (the usual SWAR test). A
/// borrow can also flag a byte above a flagged one, never below: the
/// lowest flagged byte is always a real one, and it is the only one used.
#[inline]
const fn zero_bytes(x: u64) -> u64 {
    x.wrapping_sub(LO) & !x & HI
}

/// Appends `s` as a JSON string to `out`.
fn write_str(s: &str, out: &mut Vec<u8>) {
    let b = s.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        // 32 bytes at a time while none needs escaping (most of most
        // strings): one test per 32 bytes instead of one per 8.
        if let Some(block) = b[i..].first_chunk::<32>() {
            let word = |k: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&block[k..k + 8]);
                needs_escape(u64::from_le_bytes(w))
            };
            if word(0) | word(8) | word(16) | word(24) == 0 {
                i += 32;
                continue;
            }
        }
        if i + 8 <= b.len() {
            let mut word = [0u8; 8];
            word.copy_from_slice(&b[i..i + 8]);
            let hits = needs_escape(u64::from_le_bytes(word));
            if hits == 0 {
                i += 8;
                continue;
            }
            // The first byte to escape in this word.
            i += (hits.trailing_zeros() / 8) as usize;
        } else if !needs(b[i]) {
            i += 1;
            continue;
        }
        out.extend_from_slice(&b[start..i]);
        escape(b[i], out);
        i += 1;
        start = i;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

#[inline]
const fn needs(c: u8) -> bool {
    c < 0x20 || c == b'"' || c == b'\\'
}

fn escape(c: u8, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match c {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        _ => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[(c >> 4) as usize],
            HEX[(c & 0xf) as usize],
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn same(map: &Map<String, Value>) {
        let mut ours = Vec::new();
        write_object(map, &mut ours);
        let theirs = serde_json::to_vec(map).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs)
        );
    }

    fn one(v: Value) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("k".into(), v);
        m
    }

    #[test]
    fn every_byte_escapes_as_serde_json_escapes_it_at_every_offset() {
        for c in 0u8..0x80 {
            for len in 0..20 {
                for at in 0..len {
                    let mut s = vec![b'a'; len];
                    s[at] = c;
                    same(&one(Value::String(String::from_utf8(s).unwrap())));
                }
            }
        }
        // Longer strings, past the 32-byte steps, at every offset.
        for c in [0u8, 0x1f, b'"', b'\\', b'\n', 0x20, 0x7f, b'a'] {
            for len in [31, 32, 33, 40, 63, 64, 65, 97] {
                for at in 0..len {
                    let mut s = vec![b'a'; len];
                    s[at] = c;
                    s[len - 1 - at] = c;
                    same(&one(Value::String(String::from_utf8(s).unwrap())));
                }
            }
        }
        // Non-ASCII and 0x7F pass through, next to escapes.
        same(&one(json!("é\u{7f}\"ü\n😀\\\u{1}\u{1f}€ 中文\t")));
        same(&one(json!(
            "\u{80}\u{7ff}\u{800}\u{ffff}\u{10000}\u{10ffff}"
        )));
    }

    #[test]
    fn values_of_every_kind_and_keys_that_need_escaping() {
        let v = json!({
            "null": null, "t": true, "f": false,
            "ints": [0, -1, 1, i64::MIN, i64::MAX, u64::MAX],
            "floats": [0.0, -0.0, 1.5, 1e300, -2.5e-300, 0.1, 123_456_789.123_456_79, f64::MAX, f64::MIN_POSITIVE],
            "nested": {"a": [[], {}, [{"b": "c\"d"}]], "e\nf": "g"},
            "": "", "\"": "\\",
            "long": "x".repeat(300),
        });
        let Value::Object(m) = v else { unreachable!() };
        same(&m);
        same(&Map::new());
    }

    #[test]
    fn generated_strings_match() {
        // xorshift: strings mixing plain ASCII runs with every kind of byte.
        let mut next = crate::test_rng::xorshift(0x9e37_79b9_7f4a_7c15);
        let pool = [
            'a', 'Z', ' ', '"', '\\', '\n', '\u{1}', '\u{1f}', '\u{7f}', 'é', '😀', '/',
        ];
        for _ in 0..5_000 {
            let len = (next() % 40) as usize;
            let s: String = (0..len)
                .map(|_| {
                    let r = next();
                    if r.is_multiple_of(3) {
                        pool[(r / 3 % pool.len() as u64) as usize]
                    } else {
                        'q'
                    }
                })
                .collect();
            let mut m = Map::new();
            m.insert(s.clone(), Value::String(s));
            same(&m);
        }
    }
}
