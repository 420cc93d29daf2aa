//! The `ctrlbus` binary, run for real: output shapes, filters, exit codes,
//! error messages, reading while another process writes, a kill -9 during
//! `bench publish --acks`, and a closed pipe.
#![cfg(feature = "cli")]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod cli_support;
mod common;
use cli_support::{BIN, Scratch, kill, lines, one_line_error, receiver, seqs, wait_for};

const INSTANCE: &str = "inst_01jddv1r7v0mzg0e3a8m0q0w4j";

/// seq 1..=6: deploy.started acme, health.passed acme, deploy.failed beta,
/// instance.created acme (with instance), deploy.succeeded acme, deploy.failed acme.
fn seeded() -> Scratch {
    let s = Scratch::new();
    s.ok(&[
        "publish",
        "deploy.started",
        "--tenant",
        "acme",
        "--actor",
        "alice",
    ]);
    s.ok(&["publish", "health.passed", "--tenant", "acme"]);
    s.ok(&["publish", "deploy.failed", "--tenant", "beta"]);
    s.ok(&[
        "publish",
        "instance.created",
        "--tenant",
        "acme",
        "--instance",
        INSTANCE,
    ]);
    s.ok(&["publish", "deploy.succeeded", "--tenant", "acme"]);
    s.ok(&["publish", "deploy.failed", "--tenant", "acme"]);
    s
}

#[test]
fn publish_prints_the_envelope_plus_seq() {
    let s = Scratch::new();
    let out = s.ok(&[
        "publish",
        "deploy.started",
        "--tenant",
        "acme",
        "--instance",
        INSTANCE,
        "--actor",
        "alice",
        "--payload",
        r#"{"version":"v2"}"#,
        "--timestamp",
        "2026-01-02T03:04:05.5+01:00",
    ]);
    let v = lines(&out);
    assert_eq!(v.len(), 1);
    let e = &v[0];
    assert_eq!(e["seq"], 1);
    assert!(e["id"].as_str().unwrap().starts_with("evt_"));
    assert_eq!(e["type"], "deploy.started");
    assert_eq!(e["tenant_id"], "acme");
    assert_eq!(e["instance_id"], INSTANCE);
    assert_eq!(e["actor_id"], "alice");
    assert_eq!(e["payload"]["version"], "v2");
    assert_eq!(e["timestamp"], "2026-01-02T02:04:05.5Z");
    // `seq` comes first, then the envelope in its JSON order.
    assert!(out.starts_with(r#"{"seq":1,"id":"evt_"#), "{out}");

    // Empty parts are omitted.
    let out = s.ok(&["publish", "health.passed", "--tenant", "acme"]);
    let e = &lines(&out)[0];
    assert_eq!(e["seq"], 2);
    for absent in ["instance_id", "actor_id", "payload"] {
        assert!(e.get(absent).is_none(), "{absent} in {out}");
    }

    // The same id again: the stored event comes back, nothing new is written.
    let id = e["id"].as_str().unwrap().to_owned();
    let again = s.ok(&["publish", "health.failed", "--tenant", "other", "--id", &id]);
    assert_eq!(lines(&again)[0]["seq"], 2);
    assert_eq!(lines(&again)[0]["type"], "health.passed");
    assert_eq!(seqs(&s.ok(&["replay"])), [1, 2]);
}

#[test]
fn replay_prints_every_event_in_log_order() {
    let s = seeded();
    let out = s.ok(&["replay"]);
    assert_eq!(seqs(&out), [1, 2, 3, 4, 5, 6]);
    // The same lines `publish` printed.
    let published = s.ok(&["publish", "deploy.started", "--tenant", "zeta"]);
    let out = s.ok(&["replay", "--from-seq", "7"]);
    assert_eq!(out, published);
}

#[test]
fn replay_filters() {
    let s = seeded();
    assert_eq!(seqs(&s.ok(&["replay", "--type", "deploy.*"])), [1, 3, 5, 6]);
    assert_eq!(seqs(&s.ok(&["replay", "--type", "deploy.failed"])), [3, 6]);
    assert_eq!(
        seqs(&s.ok(&["replay", "--type", "deploy.failed", "--type", "health.*"])),
        [2, 3, 6]
    );
    assert_eq!(seqs(&s.ok(&["replay", "--tenant", "beta"])), [3]);
    assert_eq!(
        seqs(&s.ok(&["replay", "--type", "deploy.*", "--tenant", "acme"])),
        [1, 5, 6]
    );
    assert_eq!(seqs(&s.ok(&["replay", "--instance", INSTANCE])), [4]);
    assert_eq!(seqs(&s.ok(&["replay", "--from-seq", "4"])), [4, 5, 6]);
    assert_eq!(
        seqs(&s.ok(&["replay", "--from-seq", "4", "--limit", "2"])),
        [4, 5]
    );
    assert_eq!(seqs(&s.ok(&["replay", "--limit", "0"])), Vec::<u64>::new());
    assert_eq!(
        seqs(&s.ok(&["replay", "--since", "15m"])),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(
        seqs(&s.ok(&[
            "replay", "--since", "15m", "--type", "deploy.*", "--tenant", "acme"
        ])),
        [1, 5, 6]
    );
    assert!(
        s.ok(&["replay", "--since", "2999-01-01T00:00:00Z"])
            .is_empty()
    );
    assert!(s.ok(&["replay", "--until", "1h"]).is_empty());
    assert_eq!(
        seqs(&s.ok(&[
            "replay",
            "--since",
            "2000-01-01T00:00:00Z",
            "--until",
            "2999-01-01T00:00:00Z"
        ])),
        [1, 2, 3, 4, 5, 6]
    );
}

#[test]
fn replay_from_a_time_between_events() {
    let s = Scratch::new();
    s.ok(&["publish", "deploy.started", "--tenant", "acme"]);
    std::thread::sleep(Duration::from_millis(50));
    let mid = jiff::Timestamp::now().to_string();
    std::thread::sleep(Duration::from_millis(50));
    s.ok(&["publish", "deploy.succeeded", "--tenant", "acme"]);
    assert_eq!(seqs(&s.ok(&["replay", "--since", &mid])), [2]);
    assert_eq!(seqs(&s.ok(&["replay", "--until", &mid])), [1]);
}

#[test]
fn table_format() {
    let s = seeded();
    let out = s.ok(&["--format", "table", "replay", "--tenant", "beta"]);
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].starts_with("SEQ  TIMESTAMP"), "{out}");
    assert!(rows[1].starts_with("3    "), "{out}");
    assert!(rows[1].contains("deploy.failed") && rows[1].contains("beta"));
    // Columns line up.
    assert_eq!(rows[0].find("TYPE"), rows[1].find("deploy.failed"));
    let stats = s.ok(&["stats", "--format", "table"]);
    assert!(
        stats
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["last_seq", "6"]),
        "{stats}"
    );
}

#[test]
fn tail_prints_the_newest_events() {
    let s = seeded();
    assert_eq!(seqs(&s.ok(&["tail", "-n", "2"])), [5, 6]);
    assert_eq!(seqs(&s.ok(&["tail"])), [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        seqs(&s.ok(&["tail", "-n", "2", "--type", "deploy.*", "--tenant", "acme"])),
        [5, 6]
    );
    assert_eq!(seqs(&s.ok(&["tail", "-n", "1", "--tenant", "beta"])), [3]);
    assert_eq!(
        seqs(&s.ok(&["tail", "-n", "100", "--type", "health.*"])),
        [2]
    );
    assert!(s.ok(&["tail", "-n", "0"]).is_empty());
}

#[test]
fn tail_follow_prints_new_events() {
    let s = seeded();
    let mut child = s
        .cmd(&[
            "tail",
            "-n",
            "1",
            "--follow",
            "--interval",
            "20ms",
            "--tenant",
            "acme",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(seqs(&line), [6]);
    // The follower holds the log read-only: a writer still gets in.
    s.ok(&["publish", "deploy.started", "--tenant", "beta"]);
    s.ok(&["publish", "deploy.rolled_back", "--tenant", "acme"]);
    line.clear();
    reader.read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v = lines(&line);
    assert_eq!(v[0]["seq"], 8);
    assert_eq!(v[0]["type"], "deploy.rolled_back");
}

#[test]
fn publish_file_reads_json_lines() {
    let s = Scratch::new();
    let file = s.path("events.jsonl");
    std::fs::write(
        &file,
        concat!(
            r#"{"type":"deploy.started","tenant_id":"acme"}"#,
            "\n\n",
            r#"{"id":"evt_01jddv1r7v0mzg0e3a8m0q0w4h","type":"deploy.failed","tenant_id":"acme","payload":{"k":1},"timestamp":"2026-01-02T03:04:05Z"}"#,
            "\n",
            r#"{"type":"health.passed","tenant_id":"beta","timestamp":"2026-01-02T03:04:06Z"}"#,
        ),
    )
    .unwrap();
    let out = s.ok(&["publish", "--file", file.to_str().unwrap()]);
    let summary = &lines(&out)[0];
    assert_eq!(summary["published"], 3);
    assert_eq!(summary["duplicates"], 0);
    assert_eq!(summary["first_seq"], 1);
    assert_eq!(summary["last_seq"], 3);
    let events = lines(&s.ok(&["replay"]));
    assert_eq!(events[1]["id"], "evt_01jddv1r7v0mzg0e3a8m0q0w4h");
    assert_eq!(events[1]["timestamp"], "2026-01-02T03:04:05Z");
    assert_eq!(events[1]["payload"]["k"], 1);
    assert!(events[0]["id"].as_str().unwrap().starts_with("evt_"));

    // Again: every id is already there (the two with given ids), the
    // first line gets a fresh id.
    let again = lines(&s.ok(&["publish", "--file", file.to_str().unwrap()]))[0].clone();
    assert_eq!(again["published"], 2);
    assert_eq!(again["duplicates"], 1);
}

#[test]
fn publish_file_from_stdin_round_trips_a_replay() {
    let s = seeded();
    let exported = s.ok(&["replay"]);
    let copy = Scratch::new();
    let out = copy.with_stdin(&["publish", "--file", "-"], exported.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lines(&String::from_utf8(out.stdout).unwrap())[0]["published"],
        6
    );
    assert_eq!(copy.ok(&["replay"]), exported);
}

#[test]
fn publish_file_is_all_or_nothing() {
    let s = Scratch::new();
    let file = s.path("bad.jsonl");
    std::fs::write(
        &file,
        concat!(
            r#"{"type":"deploy.started","tenant_id":"acme"}"#,
            "\n",
            r#"{"type":"deploy.started","tenant_id":"acme"}"#,
            "\n",
            r#"{"type":"deploy.started","tenant_id":"acme","payload":[1]}"#,
            "\n",
            r#"{"type":"deploy.started","tenant_id":"acme"}"#,
            "\n",
        ),
    )
    .unwrap();
    let err = s.fails(&["publish", "--file", file.to_str().unwrap()], 1);
    one_line_error(&err);
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("payload"), "{err}");
    assert!(err.contains("nothing was published"), "{err}");
    // Nothing from that file, not even the good lines before the bad one.
    if s.db.exists() {
        assert!(s.ok(&["replay"]).is_empty());
    }

    let out = s.run(&[
        "publish",
        "--file",
        file.to_str().unwrap(),
        "--skip-invalid",
    ]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 3") && stderr.contains("skipped"),
        "{stderr}"
    );
    let summary = &lines(&String::from_utf8(out.stdout).unwrap())[0];
    assert_eq!(summary["published"], 3);
    assert_eq!(summary["skipped"], 1);

    // Invalid JSON names its line too.
    std::fs::write(&file, "{\"type\":\"a.b\",\"tenant_id\":\"x\"}\n{not json\n").unwrap();
    let err = s.fails(&["publish", "--file", file.to_str().unwrap()], 1);
    assert!(
        err.contains("line 2") && err.contains("invalid JSON"),
        "{err}"
    );
    assert_eq!(seqs(&s.ok(&["replay"])), [1, 2, 3]);
}

#[test]
fn bad_input_is_refused_with_one_line() {
    let s = seeded();
    // Bad flag values are usage errors: exit 2.
    let err = s.fails(&["replay", "--since", "15x"], 2);
    one_line_error(&err);
    assert!(
        err.contains("--since") && err.contains("invalid TIME \"15x\""),
        "{err}"
    );
    let err = s.fails(&["replay", "--since", "yesterday"], 2);
    assert!(err.contains("RFC 3339"), "{err}");
    let err = s.fails(&["retain", "--max-age", "5"], 2);
    assert!(err.contains("invalid DUR"), "{err}");
    let err = s.fails(
        &[
            "publish",
            "deploy.started",
            "--tenant",
            "a",
            "--payload",
            "{bad",
        ],
        2,
    );
    one_line_error(&err);
    assert!(
        err.contains("--payload") && err.contains("not valid JSON"),
        "{err}"
    );
    let err = s.fails(
        &[
            "publish",
            "deploy.started",
            "--tenant",
            "a",
            "--payload",
            "[1,2]",
        ],
        2,
    );
    assert!(err.contains("JSON object"), "{err}");
    let err = s.fails(&["publish", "Deploy", "--tenant", "a"], 2);
    assert!(err.contains("invalid event type"), "{err}");
    let err = s.fails(&["replay", "--type", "de*ploy"], 2);
    assert!(err.contains("pattern"), "{err}");
    let err = s.fails(
        &["replay", "--instance", "evt_01jddv1r7v0mzg0e3a8m0q0w4j"],
        2,
    );
    assert!(err.contains("inst"), "{err}");
    s.fails(&["replay", "--since", "15m", "--from-seq", "3"], 2);
    s.fails(&["frobnicate"], 2);
    s.fails(&["publish"], 2);
    s.fails(&["cursors", "seek", "x"], 2);
    // Runtime errors: exit 1.
    let err = s.fails(&["cursors", "show", "nope"], 1);
    one_line_error(&err);
    assert!(err.contains("unknown cursor \"nope\""), "{err}");
    let err = s.fails(&["cursors", "seek", "nope", "--beginning"], 1);
    assert!(err.contains("unknown cursor"), "{err}");
    let err = s.fails(&["cursors", "delete", "nope"], 1);
    assert!(err.contains("unknown cursor"), "{err}");
    let missing = s.path("missing.jsonl");
    let err = s.fails(&["publish", "--file", missing.to_str().unwrap()], 1);
    one_line_error(&err);
    assert!(err.contains("missing.jsonl"), "{err}");
    // Reading a log that does not exist.
    let none = Scratch::new();
    for cmd in [
        &["replay"][..],
        &["tail"],
        &["stats"],
        &["check"],
        &["cursors", "list"],
    ] {
        let err = none.fails(cmd, 1);
        one_line_error(&err);
        assert!(err.contains("no log at"), "{cmd:?}: {err}");
        assert!(!none.db.exists(), "a reading command created the log");
    }
    // A file that is not a log is left alone.
    let junk = s.path("junk.redb");
    std::fs::write(&junk, b"hello, not a database").unwrap();
    let out = Command::new(BIN)
        .args([
            "--db",
            junk.to_str().unwrap(),
            "publish",
            "a.b",
            "--tenant",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a ctrlbus log"));
    assert_eq!(std::fs::read(&junk).unwrap(), b"hello, not a database");
}

#[test]
fn db_defaults_to_the_environment() {
    let s = seeded();
    let out = Command::new(BIN)
        .env("CTRLBUS_DB", &s.db)
        .arg("stats")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        lines(&String::from_utf8(out.stdout).unwrap())[0]["events"],
        6
    );
    // Without either, ./ctrlbus.redb.
    let out = Command::new(BIN)
        .env_remove("CTRLBUS_DB")
        .current_dir(s.dir.path())
        .args(["publish", "a.b", "--tenant", "x"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(s.path("ctrlbus.redb").exists());
}

/// Creates a durable cursor through the library (the CLI only manages them).
fn make_cursor(db: &Path, name: &str) {
    use ctrlbus::{Event, Filter, HandlerError, Position};
    let bus = ctrlbus::DurableBus::open(db).unwrap();
    let sub = bus
        .subscribe_durable(
            name,
            Filter::types(["deploy.*"]).unwrap(),
            Position::Beginning,
            |_: &Event| -> Result<(), HandlerError> { Ok(()) },
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sub.position() < bus.last_seq() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(sub);
    ctrlbus::Bus::close(&bus);
}

#[test]
fn cursors_list_show_seek_delete() {
    let s = seeded();
    assert!(s.ok(&["cursors", "list"]).is_empty());
    make_cursor(&s.db, "billing");
    let list = lines(&s.ok(&["cursors", "list"]));
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "billing");
    assert_eq!(list[0]["delivered_seq"], 6);
    assert_eq!(list[0]["lag"], 0);
    assert_eq!(list[0]["filter"]["types"][0], "deploy.*");

    let shown = &lines(&s.ok(&["cursors", "show", "billing"]))[0];
    assert_eq!(shown["name"], "billing");
    assert!(shown["dead_letter_events"].as_array().unwrap().is_empty());

    // `stats` shows the same lag as `cursors list`, and no apply lag.
    let stats = &lines(&s.ok(&["stats"]))[0];
    assert_eq!(stats["subscription_lag"]["billing"], 0);
    assert_eq!(stats["apply_lag_events"], 0);

    let sought = &lines(&s.ok(&["cursors", "seek", "billing", "--to-seq", "3"]))[0];
    assert_eq!(sought["next_seq"], 3);
    let stats = &lines(&s.ok(&["stats"]))[0];
    assert_eq!(
        stats["subscription_lag"]["billing"], 4,
        "seq 3 to 6 are after it"
    );
    assert_eq!(
        lines(&s.ok(&["cursors", "show", "billing"]))[0]["lag"],
        4,
        "as cursors says"
    );
    let sought = &lines(&s.ok(&["cursors", "seek", "billing", "--beginning"]))[0];
    assert_eq!(sought["next_seq"], 1);
    let sought = &lines(&s.ok(&["cursors", "seek", "billing", "--end"]))[0];
    assert_eq!(sought["next_seq"], 7);
    let sought = &lines(&s.ok(&["cursors", "seek", "billing", "--to", "1h"]))[0];
    assert_eq!(sought["next_seq"], 1);
    let sought = &lines(&s.ok(&["cursors", "seek", "billing", "--to", "2999-01-01T00:00:00Z"]))[0];
    assert_eq!(sought["next_seq"], 7);

    let table = s.ok(&["--format", "table", "cursors", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("billing"));

    let deleted = &lines(&s.ok(&["cursors", "delete", "billing"]))[0];
    assert_eq!(deleted["deleted"], "billing");
    assert!(s.ok(&["cursors", "list"]).is_empty());
    s.fails(&["cursors", "show", "billing"], 1);
}

#[test]
fn stats_check_retain_compact() {
    let s = seeded();
    let stats = &lines(&s.ok(&["stats"]))[0];
    assert_eq!(stats["events"], 6);
    assert_eq!(stats["first_seq"], 1);
    assert_eq!(stats["last_seq"], 6);
    assert!(stats["file_bytes"].as_u64().unwrap() > 0);
    assert!(stats["last_appended_at"].is_string());

    let report = &lines(&s.ok(&["check"]))[0];
    assert_eq!(report["events_checked"], 6);
    assert_eq!(report["problems"].as_array().unwrap().len(), 0);

    let retained = &lines(&s.ok(&["retain", "--max-events", "2"]))[0];
    assert_eq!(retained["removed"], 4);
    assert_eq!(retained["first_seq"], 5);
    assert_eq!(seqs(&s.ok(&["replay"])), [5, 6]);
    let retained = &lines(&s.ok(&["retain", "--max-age", "1h"]))[0];
    assert_eq!(retained["removed"], 0);
    s.fails(&["retain"], 2);

    let compacted = &lines(&s.ok(&["compact"]))[0];
    assert!(
        compacted["bytes_after"].as_u64().unwrap() <= compacted["bytes_before"].as_u64().unwrap()
    );
    assert_eq!(seqs(&s.ok(&["replay"])), [5, 6]);
    // seq numbers are never reused.
    assert_eq!(seqs(&s.ok(&["publish", "a.b", "--tenant", "x"])), [7]);
    s.ok(&["check"]);
}

#[test]
fn completions_and_help() {
    let s = Scratch::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = s.ok(&["completions", shell]);
        assert!(out.contains("replay"), "{shell}");
    }
    s.fails(&["completions", "tcsh"], 2);
    let help = s.ok(&["--help"]);
    assert!(help.contains("Examples:"));
    for cmd in [
        &["publish"][..],
        &["replay"],
        &["tail"],
        &["cursors", "list"],
        &["cursors", "show"],
        &["cursors", "seek"],
        &["cursors", "delete"],
        &["stats"],
        &["check"],
        &["compact"],
        &["retain"],
        &["bench", "publish"],
        &["completions"],
        &["webhooks", "add"],
        &["webhooks", "list"],
        &["webhooks", "show"],
        &["webhooks", "update"],
        &["webhooks", "enable"],
        &["webhooks", "disable"],
        &["webhooks", "rotate-secret"],
        &["webhooks", "rm"],
        &["webhooks", "replay"],
        &["deliveries", "list"],
        &["deliveries", "show"],
        &["deliveries", "retry"],
        &["deliver"],
        &["demo"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let help = s.ok(&args);
        assert!(help.contains("Example"), "no example in {cmd:?} --help");
        assert!(help.contains("ctrlbus "), "{cmd:?}");
    }
    assert!(s.ok(&["--version"]).starts_with("ctrlbus "));
}

#[test]
fn bench_publish_prints_one_json_line() {
    let s = Scratch::new();
    let acks = s.path("acks.txt");
    let out = s.ok(&[
        "bench",
        "publish",
        "--events",
        "200",
        "--publishers",
        "4",
        "--payload-bytes",
        "100",
        "--acks",
        acks.to_str().unwrap(),
    ]);
    let v = lines(&out);
    assert_eq!(v.len(), 1);
    let r = &v[0];
    assert_eq!(r["system"], "ctrlbus");
    assert_eq!(r["publishers"], 4);
    assert_eq!(r["events"], 200);
    assert_eq!(r["payload_bytes"], 100);
    assert!(r["events_per_sec"].as_f64().unwrap() > 0.0);
    assert!(r["p50_us"].as_u64().unwrap() <= r["p99_us"].as_u64().unwrap());
    if cfg!(target_os = "linux") {
        // Ticks of 10 ms: 200 events may cost less than one, so only the
        // range is sure here (the unit tests check that time is counted).
        let cpu = r["cpu_us_per_event"].as_f64().expect("cpu_us_per_event");
        assert!(cpu.is_finite() && cpu >= 0.0, "{cpu}");
        let steal = r["steal_pct"].as_f64().expect("steal_pct");
        assert!((0.0..=100.0).contains(&steal), "{steal}");
    }
    let ids: Vec<String> = std::fs::read_to_string(&acks)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 200);
    let replayed: HashSet<String> = lines(&s.ok(&["replay"]))
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(replayed.len(), 200);
    assert!(ids.iter().all(|id| replayed.contains(id)));
}

#[test]
fn reading_commands_work_while_another_process_writes() {
    let s = Scratch::new();
    s.ok(&["publish", "deploy.started", "--tenant", "acme"]);
    make_cursor(&s.db, "audit");
    let mut writer = s
        .cmd(&[
            "bench",
            "publish",
            "--events",
            "1000000",
            "--publishers",
            "4",
            "--payload-bytes",
            "50",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let last_seq = |s: &Scratch| lines(&s.ok(&["stats"]))[0]["last_seq"].as_u64().unwrap();
    wait_for("the writer to publish", || last_seq(&s) > 50);

    // Every reading command works, and sees the writer's commits.
    let first = last_seq(&s);
    let replayed = seqs(&s.ok(&["replay"]));
    assert!(replayed.len() as u64 >= first);
    assert_eq!(
        replayed,
        (1..=replayed.len() as u64).collect::<Vec<_>>(),
        "no gap"
    );
    assert_eq!(seqs(&s.ok(&["tail", "-n", "3"])).len(), 3);
    assert_eq!(lines(&s.ok(&["cursors", "list"]))[0]["name"], "audit");
    s.ok(&["cursors", "show", "audit"]);
    assert_eq!(
        lines(&s.ok(&["check"]))[0]["problems"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    wait_for("more events", || last_seq(&s) > first);

    // A writing command is refused, clearly, and the writer keeps going.
    let still_running = writer.try_wait().unwrap().is_none();
    if still_running {
        let err = s.fails(&["publish", "a.b", "--tenant", "x"], 1);
        one_line_error(&err);
        assert!(err.contains("in use by another process"), "{err}");
        let err = s.fails(&["cursors", "delete", "audit"], 1);
        assert!(err.contains("in use"), "{err}");
        let err = s.fails(&["compact"], 1);
        assert!(err.contains("in use"), "{err}");
    }
    kill(&mut writer);
}

#[cfg(unix)]
#[test]
fn kill_9_during_bench_loses_no_acknowledged_event() {
    let s = Scratch::new();
    let acks = s.path("acks.txt");
    for round in 0..2 {
        // The publishers share one thread, then have one thread each.
        let threads = if round == 0 { "1" } else { "8" };
        let mut child = s
            .cmd(&[
                "bench",
                "publish",
                "--events",
                "1000000",
                "--publishers",
                "8",
                "--threads",
                threads,
                "--payload-bytes",
                "200",
                "--acks",
                acks.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let want = 300 * (round + 1);
        wait_for("acknowledged events", || {
            std::fs::read_to_string(&acks).map_or(0, |t| t.lines().count()) > want
        });
        std::thread::sleep(Duration::from_millis(30 * round as u64 + 10));
        // SIGKILL: no destructor, no flush, no close.
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let acked: Vec<String> = std::fs::read_to_string(&acks)
        .unwrap()
        .lines()
        // The last line may be cut short by the kill.
        .filter(|l| l.len() == 30)
        .map(str::to_owned)
        .collect();
    assert!(acked.len() > 600);
    let out = s.run(&["replay"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed = lines(&String::from_utf8(out.stdout).unwrap());
    let ids: HashSet<&str> = replayed.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| !ids.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged ids lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    let seqs: Vec<u64> = replayed
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap");
    s.ok(&["check"]);
}

#[test]
fn a_closed_pipe_exits_zero_quietly() {
    let s = Scratch::new();
    s.ok(&[
        "bench",
        "publish",
        "--events",
        "20000",
        "--publishers",
        "8",
        "--payload-bytes",
        "200",
    ]);
    for args in [
        &["replay"][..],
        &["tail", "-n", "20000"],
        &["--format", "table", "replay"],
    ] {
        let mut child = s
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 1];
        stdout.read_exact(&mut first).unwrap();
        drop(stdout); // like `| head -c 1`
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

#[test]
fn webhooks_and_deliveries() {
    let s = Scratch::new();
    let recv = receiver();
    // A loopback target needs --allow-private-targets.
    let err = s.fails(
        &["webhooks", "add", "--tenant", "acme", "--url", &recv.url],
        1,
    );
    one_line_error(&err);
    assert!(err.contains("private"), "{err}");
    let added = &lines(&s.ok(&[
        "webhooks",
        "add",
        "--tenant",
        "acme",
        "--url",
        &recv.url,
        "--event",
        "deploy.*",
        "--allow-private-targets",
    ]))[0];
    let hook = added["id"].as_str().unwrap().to_owned();
    let secret = added["secret"].as_str().unwrap().to_owned();
    assert!(hook.starts_with("hook_"));
    assert!(secret.starts_with("whsec_"));
    assert_eq!(added["tenant_id"], "acme");
    assert_eq!(added["events"][0], "deploy.*");
    assert_eq!(added["active"], true);

    // The secret is never shown again.
    let listed = s.ok(&["webhooks", "list"]);
    assert_eq!(lines(&listed).len(), 1);
    assert!(!listed.contains("whsec_"), "{listed}");
    assert!(s.ok(&["webhooks", "list", "--tenant", "beta"]).is_empty());
    let shown = s.ok(&["webhooks", "show", &hook]);
    assert!(!shown.contains("whsec_"));
    assert_eq!(lines(&shown)[0]["id"], hook.as_str());
    assert!(
        s.ok(&["--format", "table", "webhooks", "list"])
            .starts_with("ID")
    );

    let event = lines(&s.ok(&["publish", "deploy.started", "--tenant", "acme"]))[0].clone();
    s.ok(&["publish", "deploy.started", "--tenant", "beta"]);
    s.ok(&["publish", "health.passed", "--tenant", "acme"]);
    let pending = lines(&s.ok(&["deliveries", "list", "--status", "pending"]));
    assert_eq!(pending.len(), 1, "one matching event of the hook's tenant");
    assert_eq!(pending[0]["seq"], 1);
    assert_eq!(pending[0]["event_id"], event["id"]);
    let delivery = pending[0]["id"].as_str().unwrap().to_owned();

    let summary = &lines(&s.ok(&[
        "deliver",
        "--until-idle",
        "--allow-private-targets",
        "--retry-schedule",
        "100ms,100ms",
        "--timeout",
        "5s",
    ]))[0];
    assert_eq!(summary["stopped_by"], "idle");
    assert_eq!(summary["succeeded"], 1);
    assert_eq!(summary["pending"], 0);
    let (headers, body) = recv.rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let body_json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body_json["id"], event["id"]);
    assert!(
        body_json.get("seq").is_none(),
        "the body is the bare envelope"
    );
    let secret_key = ctrlbus::Secret::parse(&secret).unwrap();
    ctrlbus::webhook::verify(&secret_key, &headers, &body, Duration::from_secs(300)).unwrap();

    let shown = &lines(&s.ok(&["deliveries", "show", &delivery]))[0];
    assert_eq!(shown["status"], "succeeded");
    assert_eq!(shown["attempts"], 1);
    assert_eq!(shown["attempt_log"][0]["status_code"], 200);
    assert!(
        s.ok(&["deliveries", "list", "--status", "pending"])
            .is_empty()
    );
    assert_eq!(
        lines(&s.ok(&["deliveries", "list", "--webhook", &hook])).len(),
        1
    );

    // Retry sends it again, with the same webhook-id.
    let retried = &lines(&s.ok(&["deliveries", "retry", &delivery]))[0];
    assert_eq!(retried["status"], "pending");
    s.ok(&["deliver", "--until-idle", "--allow-private-targets"]);
    let (headers, _) = recv.rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let id_header = headers.iter().find(|(k, _)| k == "webhook-id").unwrap();
    assert_eq!(id_header.1, event["id"].as_str().unwrap());

    // Admin.
    let rotated = &lines(&s.ok(&["webhooks", "rotate-secret", &hook]))[0];
    let new_secret = rotated["secret"].as_str().unwrap();
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);
    let updated = &lines(&s.ok(&["webhooks", "update", &hook, "--event", "health.*"]))[0];
    assert_eq!(updated["events"][0], "health.*");
    assert!(updated.get("secret").is_none());
    let disabled = &lines(&s.ok(&["webhooks", "disable", &hook]))[0];
    assert_eq!(disabled["active"], false);
    let err = s.fails(&["webhooks", "replay", &hook, "--since", "1h"], 1);
    one_line_error(&err);
    let enabled = &lines(&s.ok(&["webhooks", "enable", &hook]))[0];
    assert_eq!(enabled["active"], true);
    let replayed = &lines(&s.ok(&["webhooks", "replay", &hook, "--since", "1h"]))[0];
    assert_eq!(replayed["deliveries_created"], 1, "health.passed of acme");
    s.fails(&["webhooks", "update", &hook], 2);

    let deleted = &lines(&s.ok(&["webhooks", "rm", &hook]))[0];
    assert_eq!(deleted["deleted"], hook.as_str());
    for cmd in ["show", "rm", "enable", "disable", "rotate-secret"] {
        let err = s.fails(&["webhooks", cmd, &hook], 1);
        one_line_error(&err);
        assert!(err.contains(&format!("no webhook {hook}")), "{cmd}: {err}");
    }
    let err = s.fails(&["webhooks", "show", "hook_nope"], 2);
    assert!(err.contains("invalid webhook id"), "{err}");
    let err = s.fails(
        &["deliveries", "show", "deli_01jddv1r7v0mzg0e3a8m0q0w4h"],
        1,
    );
    assert!(err.contains("no webhook delivery"), "{err}");
    s.fails(&["deliveries", "list", "--status", "lost"], 2);
    s.fails(&["deliver", "--retry-schedule", "1s,x"], 2);
    // Delivery records stay for audit.
    assert_eq!(
        lines(&s.ok(&["deliveries", "list", "--webhook", &hook])).len(),
        2
    );
}

#[cfg(unix)]
#[test]
fn deliver_runs_until_a_signal_and_reading_works_meanwhile() {
    let s = Scratch::new();
    let recv = receiver();
    s.add_local_hook("acme", &recv.url);
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let mut child = s
            .cmd(&["deliver", "--allow-private-targets", "--workers", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Give it time to open the log (a publish racing its open would
        // make it exit with "in use" instead).
        std::thread::sleep(Duration::from_millis(700));
        assert!(child.try_wait().unwrap().is_none(), "deliver exited early");
        // The log is held: writers are refused, readers are not.
        let err = s.fails(&["publish", "deploy.started", "--tenant", "acme"], 1);
        assert!(err.contains("in use by another process"), "{err}");
        s.ok(&["webhooks", "list"]);
        s.ok(&["deliveries", "list"]);
        s.ok(&["stats"]);
        assert!(child.try_wait().unwrap().is_none(), "deliver exited early");
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // The test crate may use unsafe: libc::kill has no safe wrapper here.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary = &lines(&String::from_utf8(out.stdout).unwrap())[0];
        assert_eq!(summary["stopped_by"], "signal", "{name}");
    }
}

#[test]
fn demo_runs_the_guided_scenario() {
    let s = Scratch::new();
    let started = Instant::now();
    let out = s.run(&["demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    for step in [
        "published seq  1  instance.created (acme)",
        "(beta)",
        "subscriber billing <-",
        "signature verified",
        "killed with SIGKILL",
        "acknowledged events survived the kill",
        "catches up",
        "more deliveries after the restart",
        "Replay from a timestamp",
        "\"seq\":",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("REJECTED"), "{stdout}");
    // The scratch log is gone, --db untouched.
    assert!(!s.db.exists());
}

#[test]
fn check_exits_1_with_a_report_when_a_record_is_unsound() {
    let s = seeded();
    s.ok(&["check"]);
    // Damage one record behind ctrlbus's back, through redb itself.
    common::stored::replace_record(&s.db, 3, b"\x01garbage");
    let out = s.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    let report = &lines(&String::from_utf8(out.stdout).unwrap())[0];
    let problems = report["problems"].as_array().unwrap();
    assert!(!problems.is_empty());
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().unwrap().contains("seq 3")),
        "{problems:?}"
    );
    let err = String::from_utf8(out.stderr).unwrap();
    one_line_error(&err);
    assert!(err.contains("check found"), "{err}");
    // Reading up to the damage still works; the damaged record is an error
    // naming its seq.
    let out = s.run(&["replay"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(seqs(&String::from_utf8(out.stdout).unwrap()), [1, 2]);
    assert!(String::from_utf8_lossy(&out.stderr).contains('3'));
}

#[test]
fn warnings_reach_stderr_and_follow_rust_log_v_and_q() {
    let s = Scratch::new();
    let other = Scratch::new();
    s.ok(&["publish", "deploy.started", "--tenant", "acme"]);
    other.ok(&["publish", "deploy.started", "--tenant", "acme"]);
    let wal = s.path("events.redb.wal");
    let foreign = other.path("events.redb.wal");
    let run = |env: Option<&str>, flags: &[&str]| {
        std::fs::copy(&foreign, &wal).unwrap();
        let mut args = flags.to_vec();
        args.extend(["publish", "deploy.started", "--tenant", "acme"]);
        let mut cmd = s.cmd(&args);
        cmd.env_remove("RUST_LOG");
        if let Some(v) = env {
            cmd.env("RUST_LOG", v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{flags:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let warned = run(None, &[]);
    assert!(
        warned.contains("WARN") && warned.contains("another log file"),
        "{warned:?}"
    );
    assert!(run(None, &["-q"]).is_empty());
    assert!(run(Some("off"), &[]).is_empty());
    let info = run(None, &["-v"]);
    assert!(info.contains("another log file"), "{info:?}");
    assert!(run(Some("error"), &[]).is_empty());
}

#[test]
fn after_a_kill_readers_recover_the_wal_and_a_deleted_wal_needs_accept_wal_loss() {
    let s = Scratch::new();
    let acks = s.path("acks.txt");
    let mut child = s
        .cmd(&[
            "bench",
            "publish",
            "--events",
            "1000000",
            "--publishers",
            "4",
            "--payload-bytes",
            "100",
            "--acks",
            acks.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("acknowledged events", || {
        std::fs::read_to_string(&acks).map_or(0, |t| t.lines().count()) > 200
    });
    kill(&mut child); // SIGKILL
    let acked = std::fs::read_to_string(&acks)
        .unwrap()
        .lines()
        .filter(|l| l.len() == 30)
        .count() as u64;
    // A copy of the crashed state, for the deleted-WAL case below.
    let copy = Scratch::new();
    std::fs::copy(&s.db, &copy.db).unwrap();

    // A reading command recovers first, so it counts every acknowledged event.
    let out = s.run(&["stats"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("recovered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = &lines(&String::from_utf8(out.stdout).unwrap())[0];
    assert!(stats["events"].as_u64().unwrap() >= acked, "{stats}");
    s.ok(&["check"]);

    // Without its WAL, the crashed log is refused by readers and writers.
    for args in [
        &["stats"][..],
        &["publish", "deploy.started", "--tenant", "acme"][..],
    ] {
        let err = copy.fails(args, 1);
        one_line_error(&err);
        assert!(
            err.contains("write-ahead log") && err.contains("--accept-wal-loss"),
            "{args:?}: {err}"
        );
    }
    let mut args = vec!["--accept-wal-loss"];
    args.extend(["publish", "deploy.started", "--tenant", "acme"]);
    copy.ok(&args);
    copy.ok(&["check"]);
}

/// A GET of `url` (`http://HOST:PORT/PATH`): (status line, body).
fn http_get(url: &str) -> (String, String) {
    use std::io::Write;
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut conn = std::net::TcpStream::connect(host).unwrap();
    write!(conn, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

#[test]
fn deliver_serves_prometheus_metrics() {
    let s = Scratch::new();
    let recv = receiver();
    s.add_local_hook("acme", &recv.url);
    for _ in 0..3 {
        s.ok(&["publish", "deploy.started", "--tenant", "acme"]);
    }
    let mut child = s
        .cmd(&[
            "deliver",
            "--allow-private-targets",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    let url = first
        .trim()
        .strip_prefix("ctrlbus: serving metrics at ")
        .unwrap_or_else(|| panic!("no metrics address on stderr: {first:?}"))
        .to_owned();
    for _ in 0..3 {
        recv.rx.recv_timeout(Duration::from_secs(30)).unwrap();
    }
    // Attempts are counted as they end; the pending gauge moves once
    // their outcomes are recorded.
    let mut body = String::new();
    wait_for(
        "three successful attempts, none pending, in the scrape",
        || {
            let (status, b) = http_get(&url);
            assert!(status.contains("200"), "{status}");
            body = b;
            body.contains("ctrlbus_webhook_attempts_total{outcome=\"success\"} 3")
                && body.contains("ctrlbus_webhook_pending 0")
        },
    );
    assert!(
        body.contains("# HELP ctrlbus_webhook_attempts_total"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE ctrlbus_webhook_attempt_seconds summary"),
        "{body}"
    );
    // Only /metrics is served.
    let other = url.replace("/metrics", "/other");
    assert!(http_get(&other).0.contains("404"));
    kill(&mut child);

    // A bad address is a usage error; one in use, a runtime error.
    let err = s.fails(&["deliver", "--metrics-addr", "localhost"], 2);
    assert!(err.contains("--metrics-addr"), "{err}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = s.fails(&["deliver", "--until-idle", "--metrics-addr", &addr], 1);
    one_line_error(&err);
    assert!(err.contains("cannot serve metrics"), "{err}");
}
