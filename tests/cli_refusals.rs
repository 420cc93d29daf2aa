//! What the `ctrlbus` binary refuses, as README's "What ctrlbus refuses"
//! table lists it, and what it accepts and gives back: a replayed line
//! publishes again, Go's zero values for `id` and `timestamp` are absent,
//! and no input file makes memory grow past 64 MiB.
#![cfg(feature = "cli")]

mod cli_support;

use std::io::Write;
use std::process::Stdio;

use cli_support::{Scratch, lines, one_line_error};

fn nested(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

#[test]
fn payload_limits_on_the_command_line() {
    let s = Scratch::new();
    let publish = |payload: &str| {
        s.run(&[
            "publish",
            "deploy.started",
            "--tenant",
            "acme",
            "--payload",
            payload,
        ])
    };
    // The payload object is level 2: 62 more levels reach the limit of 64.
    let at_limit = format!("{{\"k\":{}}}", nested(62));
    assert!(publish(&at_limit).status.success());
    for past in [
        format!("{{\"k\":{}}}", nested(63)),
        format!("{{\"k\":{}}}", nested(124)),
    ] {
        let out = publish(&past);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8(out.stderr).unwrap();
        one_line_error(&err);
        assert!(err.contains("64 levels"), "{err}");
    }
    let out = publish("{\"n\":123456789012345678901234567890}");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("outside the 64-bit range"), "{err}");
    let err = s.fails(
        &["publish", "deploy.started", "--tenant", &"t".repeat(257)],
        2,
    );
    assert!(
        err.contains("`tenant_id` is longer than the limit of 256"),
        "{err}"
    );
    let err = s.fails(
        &[
            "publish",
            "deploy.started",
            "--tenant",
            "acme",
            "--timestamp",
            "800000d",
        ],
        2,
    );
    one_line_error(&err);
    assert!(err.contains("0000-9999"), "{err}");
    // Only the event at the limit was written; it replays, and its line
    // publishes again into another log.
    let replayed = s.ok(&["replay"]);
    assert_eq!(lines(&replayed).len(), 1);
    let other = Scratch::new();
    let out = other.with_stdin(&["publish", "--file", "-"], replayed.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(other.ok(&["replay"]), replayed);
}

#[test]
fn publish_file_treats_go_zero_values_as_absent() {
    let s = Scratch::new();
    let input = concat!(
        r#"{"id":"","type":"deploy.started","tenant_id":"acme","timestamp":"2026-01-01T00:00:00Z"}"#,
        "\n",
        r#"{"id":null,"type":"deploy.started","tenant_id":"acme","timestamp":null}"#,
        "\n",
        r#"{"type":"deploy.started","tenant_id":"acme"}"#,
        "\n",
    );
    let out = s.with_stdin(&["publish", "--file", "-"], input.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = lines(&s.ok(&["replay"]));
    assert_eq!(events.len(), 3);
    let mut ids: Vec<_> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each got a fresh id");
    for bad in [
        r#"{"type":"deploy.started","timestamp":"-000001-06-01T00:00:00Z"}"#,
        r#"{"type":"deploy.started","timestamp":"2016-12-31T23:59:60Z"}"#,
        r#"{"type":"deploy.started","payload":{"n":99999999999999999999}}"#,
    ] {
        let out = s.with_stdin(&["publish", "--file", "-"], bad.as_bytes());
        assert_eq!(out.status.code(), Some(1), "{bad}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("line 1"), "{err}");
    }
    assert_eq!(lines(&s.ok(&["replay"])).len(), 3, "nothing more written");
}

/// Runs `ctrlbus publish --file -` with the file `input` on standard input
/// and returns (exit code, stderr, peak RSS in KiB). The input is never in
/// this process's memory: a child's peak RSS includes what its parent had
/// resident when it was spawned (the child runs in the parent's memory
/// until it execs).
#[cfg(target_os = "linux")]
fn publish_stdin_peak(s: &Scratch, extra: &[&str], input: &std::path::Path) -> (i32, String, i64) {
    let mut args = vec!["publish", "--file", "-"];
    args.extend_from_slice(extra);
    // Reaped by the wait4 below, which std's wait can't replace.
    #[allow(clippy::zombie_processes)]
    let child = s
        .cmd(&args)
        .stdin(std::fs::File::open(input).unwrap())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(s.path("stderr.txt")).unwrap())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: a plain wait4 on our own child, into a zeroed rusage; the
    // test crate may use unsafe where libc has no safe wrapper (std's wait
    // gives no rusage).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let got = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
    assert_eq!(got, pid);
    let stderr = std::fs::read_to_string(s.path("stderr.txt")).unwrap();
    (libc::WEXITSTATUS(status), stderr, usage.ru_maxrss)
}

/// Writes `parts` to a file in the scratch directory, `repeat` times.
fn input_file(s: &Scratch, name: &str, repeat: usize, parts: &[&[u8]]) -> std::path::PathBuf {
    let path = s.path(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for _ in 0..repeat {
        for p in parts {
            f.write_all(p).unwrap();
        }
    }
    f.flush().unwrap();
    path
}

#[cfg(target_os = "linux")]
#[test]
fn no_input_file_takes_more_than_64_mib() {
    let s = Scratch::new();
    // One 30 MB line: refused without being held whole.
    let head: &[u8] = br#"{"type":"deploy.started","tenant_id":"acme","payload":{"k":""#;
    let filler = vec![b'x'; 30 << 20];
    let tail: &[u8] = b"\"}}\n";
    let huge = input_file(&s, "huge.jsonl", 1, &[head, &filler, tail]);
    let (code, err, peak_kib) = publish_stdin_peak(&s, &[], &huge);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("line 1") && err.contains("longer than the limit"),
        "{err}"
    );
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");

    // With --skip-invalid the lines after it are still read and published.
    let next: &[u8] = br#"{"type":"deploy.started","tenant_id":"acme"}"#;
    let mixed = input_file(&s, "mixed.jsonl", 1, &[head, &filler, tail, next]);
    drop(filler);
    let (code, err, _) = publish_stdin_peak(&s, &["--skip-invalid"], &mixed);
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines(&s.ok(&["replay"])).len(), 1);

    // Many events of the largest accepted size: batches are bounded in
    // bytes, not only in count.
    let value = vec![b'y'; (1 << 20) - 16];
    let big = input_file(&s, "big.jsonl", 60, &[head, &value, tail]);
    drop(value);
    let (code, err, peak_kib) = publish_stdin_peak(&s, &[], &big);
    assert_eq!(code, 0, "{err}");
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
    assert_eq!(lines(&s.ok(&["replay", "--limit", "100"])).len(), 61);
}
