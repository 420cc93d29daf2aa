//! Replays every fuzz target's committed corpus (`fuzz/corpus/<target>/`)
//! through the same entry points the fuzzers call, so CI exercises them
//! without a fuzzer. Regression inputs for findings live in the corpora too.
//!
//! `cargo test --test fuzz_corpus -- --ignored write_seeds` regenerates the
//! seed files from real records, events, filters, times and signatures.
#![cfg(feature = "fuzzing")] // uses the fuzz entry points, test hooks behind the feature

use std::path::PathBuf;

use ctrlbus::__fuzz;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus for {target}");
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

fn replay(target: &str, f: fn(&[u8])) {
    let files = corpus(target);
    for (path, bytes) in &files {
        let r = std::panic::catch_unwind(|| f(bytes));
        assert!(r.is_ok(), "{target}: input {} fails", path.display());
    }
}

#[test]
fn record() {
    replay("record", __fuzz::record);
}

#[test]
fn block() {
    replay("block", __fuzz::block);
}

#[test]
fn event_json() {
    replay("event_json", __fuzz::event_json);
}

#[test]
fn filter() {
    replay("filter", __fuzz::filter);
}

#[test]
fn time() {
    replay("time", __fuzz::time);
}

#[test]
fn signature() {
    replay("signature", __fuzz::signature);
}

#[test]
fn storage() {
    replay("storage", __fuzz::storage);
}

#[test]
#[ignore = "writes the seed corpora"]
fn write_seeds() {
    use ctrlbus::{Event, InstanceId, Type};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let d = root.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("seed-{name}")), bytes).unwrap();
    };
    let full = Event::new(Type::DEPLOY_ROLLED_BACK, "tenant-1")
        .with_instance(InstanceId::new())
        .with_actor("alice")
        .with_payload_value("reason", "oom")
        .with_payload_value("nested", serde_json::json!({"a": [1, 2.5, null, true]}));
    let bare = Event::new(Type::HEALTH_PASSED, "");
    put(
        "record",
        "full",
        &ctrlbus::__fuzz::encoded_record(&full, 1_700_000_000_000_000_000),
    );
    put("record", "bare", &ctrlbus::__fuzz::encoded_record(&bare, 0));
    put("record", "empty", b"");
    let (r1, r2) = (
        ctrlbus::__fuzz::encoded_record(&full, 1),
        ctrlbus::__fuzz::encoded_record(&bare, 2),
    );
    let two = ctrlbus::__fuzz::encoded_block(&[&r1, &r2]);
    put("block", "two", &two);
    put(
        "block",
        "one_empty",
        &ctrlbus::__fuzz::encoded_block(&[b""]),
    );
    put("block", "truncated", &two[..two.len() - 1]);
    put("block", "no_records", &0u32.to_le_bytes());
    put("block", "count_past_end", &u32::MAX.to_le_bytes());
    put("record", "bad_version", &[2, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    put("event_json", "full", full.to_json().as_bytes());
    put("event_json", "bare", bare.to_json().as_bytes());
    put("event_json", "payload_not_object", br#"{"id":"evt_01jddv1r7v0mzg0e3a8m0q0w4h","type":"a","tenant_id":"","payload":[1],"timestamp":"2026-01-01T00:00:00Z"}"#);
    put("event_json", "offset_time", br#"{"id":"evt_01jddv1r7v0mzg0e3a8m0q0w4h","type":"deploy.started","tenant_id":"t","timestamp":"2026-01-01T02:00:00.5+02:00"}"#);
    put("filter", "pattern_prefix", b"deploy.*");
    put("filter", "pattern_all", b"*");
    put("filter", "type", b"health.degraded");
    put(
        "filter",
        "json",
        br#"{"types":["deploy.*","health.failed"],"tenant_id":"t1"}"#,
    );
    put(
        "filter",
        "json_instance",
        br#"{"instance_id":"inst_01jddv1r7v0mzg0e3a8m0q0w4h"}"#,
    );
    for (n, s) in [
        ("rfc3339", "2026-11-27T05:00:00Z"),
        ("offset", "2026-11-27T07:00:00.123+02:00"),
        ("span_m", "15m"),
        ("span_d", "7d"),
        ("ms", "100ms"),
        ("h", "2h"),
        ("bad", "15x"),
    ] {
        put("time", n, s.as_bytes());
    }
    put(
        "signature",
        "canonical",
        b"v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=\n{\"test\": 2432232314}",
    );
    put(
        "signature",
        "several",
        b"v2,abc v1,AAAA v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=\n{\"test\": 2432232314}",
    );
    put("signature", "garbage", b"v1\n");
    for (n, b) in [
        ("early_fail", vec![0u8, 3, 1, 2, 3]),
        (
            "late_fail",
            vec![40u8, 0, 200, 7, 9, 130, 1, 2, 3, 4, 5, 6, 7, 8],
        ),
        ("no_fail", vec![255u8; 20]),
        ("batch", vec![9u8, 9, 129, 130, 131, 1]),
    ] {
        put("storage", n, &b);
    }
}
