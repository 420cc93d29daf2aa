//! Property tests: seek by time (G7) and filters (G9) against a model.
//!
//! The model is a `Vec` of `(seq, append time, event)`. Append times are
//! assigned by the bus, so they are taken from `read()` once (and checked
//! never to decrease along `seq`); every other read is then compared with
//! what the model says. The redb file holds a random prefix of the log and
//! the rest is read from memory, so reads cross from one to the other.

mod common;
use common::recorder;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctrlbus::{Bus, DurableBus, Event, EventId, Filter, InstanceId, Position, Type};
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;

const TYPES: [Type; 6] = [
    Type::DEPLOY_STARTED,
    Type::DEPLOY_FAILED,
    Type::DEPLOY_ROLLED_BACK,
    Type::HEALTH_PASSED,
    Type::INSTANCE_CREATED,
    Type::INSTANCE_SCALED,
];
const TENANTS: [&str; 3] = ["", "t1", "t2"];
const PATTERNS: [&str; 8] = [
    "*",
    "deploy.*",
    "health.*",
    "instance.*",
    "deploy.failed",
    "instance.scaled",
    "deploy.rolled_back",
    "nothing.here",
];

/// One event to publish: (type, tenant, instance index or none).
type Spec = (usize, usize, Option<usize>);

fn spec() -> impl Strategy<Value = Spec> {
    (
        0..TYPES.len(),
        0..TENANTS.len(),
        proptest::option::of(0..3usize),
    )
}

/// Batches of events; each batch is one `publish_batch` (one append time),
/// with a pause after some batches so that times differ.
fn batches() -> impl Strategy<Value = Vec<(Vec<Spec>, bool)>> {
    proptest::collection::vec(
        (proptest::collection::vec(spec(), 1..5), any::<bool>()),
        1..8,
    )
}

#[derive(Debug, Clone)]
struct FilterSpec {
    patterns: Vec<usize>,
    tenant: Option<usize>,
    instance: Option<usize>,
}

fn filter_spec() -> impl Strategy<Value = FilterSpec> {
    (
        proptest::collection::vec(0..PATTERNS.len(), 0..3),
        proptest::option::of(0..TENANTS.len()),
        proptest::option::of(0..4usize),
    )
        .prop_map(|(patterns, tenant, instance)| FilterSpec {
            patterns,
            tenant,
            instance,
        })
}

fn build_filter(f: &FilterSpec, instances: &[InstanceId; 4]) -> Filter {
    let mut filter = Filter::types(f.patterns.iter().map(|p| PATTERNS[*p])).unwrap();
    if let Some(t) = f.tenant {
        filter = filter.tenant(TENANTS[t]);
    }
    if let Some(i) = f.instance {
        filter = filter.instance(instances[i]);
    }
    filter
}

/// The model's idea of a filter: written out from the rules, not with
/// `Filter::matches`.
fn model_matches(f: &FilterSpec, instances: &[InstanceId; 4], e: &Event) -> bool {
    let t = e.event_type.as_str();
    let type_ok = f.patterns.is_empty()
        || f.patterns.iter().any(|p| match PATTERNS[*p] {
            "*" => true,
            p if p.ends_with(".*") => t.starts_with(&p[..p.len() - 1]),
            p => p == t,
        });
    let tenant_ok = f.tenant.is_none_or(|i| e.tenant_id == TENANTS[i]);
    let instance_ok = f
        .instance
        .is_none_or(|i| e.instance_id == Some(instances[i]));
    type_ok && tenant_ok && instance_ok
}

struct Model {
    entries: Vec<(u64, Timestamp, Event)>,
}

/// Publishes `batches`; the file holds the first `applied` of them (an
/// apply is forced there, and none runs on its own), the rest are read
/// from memory (`read_tail`), so every read crosses from one to the other.
fn setup(
    batches: &[(Vec<Spec>, bool)],
    instances: &[InstanceId; 4],
    applied: usize,
) -> (tempfile::TempDir, DurableBus, Model) {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::builder()
        .sync(false)
        .apply_interval(Duration::from_secs(3600))
        .open(dir.path().join("log.redb"))
        .unwrap();
    let mut published = Vec::new();
    for (i, (batch, pause)) in batches.iter().enumerate() {
        if i == applied {
            // `stats` waits for the applier.
            bus.stats().unwrap();
        }
        let events: Vec<Event> = batch
            .iter()
            .map(|(t, tenant, inst)| {
                let mut e = Event::new(TYPES[*t].clone(), TENANTS[*tenant]);
                if let Some(i) = inst {
                    e = e.with_instance(instances[*i]);
                }
                e
            })
            .collect();
        let receipts = bus.publish_batch(events.clone()).unwrap();
        for (r, e) in receipts.iter().zip(events) {
            published.push((r.seq, e));
        }
        if *pause {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let entries: Vec<(u64, Timestamp, Event)> = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.seq, e.appended_at, e.event)
        })
        .collect();
    // The log is what was published, in order, with its own timestamps.
    assert_eq!(entries.len(), published.len());
    for ((seq, _, e), (pseq, pe)) in entries.iter().zip(&published) {
        assert_eq!((seq, e), (pseq, pe));
    }
    // G7: append times never decrease along seq; one batch shares one.
    for w in entries.windows(2) {
        assert!(w[0].1 <= w[1].1, "append time decreased at seq {}", w[1].0);
    }
    (dir, bus, Model { entries })
}

fn seqs(bus: &DurableBus, from: Position, filter: &Filter) -> Vec<u64> {
    bus.read(from, filter)
        .unwrap()
        .map(|e| e.unwrap().seq)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn seek_by_time_matches_the_model(
        batches in batches(),
        filters in proptest::collection::vec(filter_spec(), 1..4),
        applied in any::<prop::sample::Index>(),
    ) {
        let instances = [InstanceId::new(), InstanceId::new(), InstanceId::new(), InstanceId::new()];
        let (_dir, bus, model) = setup(&batches, &instances, applied.index(batches.len() + 1));
        let first = model.entries.first().unwrap().1;
        let last = model.entries.last().unwrap().1;
        // Every append time exactly, one nanosecond either side, before the
        // first, after the last, and far away.
        let ns = SignedDuration::from_nanos(1);
        let mut times = vec![
            first - SignedDuration::from_secs(3600),
            first - ns,
            last + ns,
            last + SignedDuration::from_secs(3600),
            Timestamp::UNIX_EPOCH,
            Timestamp::MIN,
            Timestamp::MAX,
        ];
        for (_, t, _) in &model.entries {
            times.extend([*t - ns, *t, *t + ns]);
        }
        let all = Filter::all();
        for t in &times {
            let want: Vec<u64> = model
                .entries
                .iter()
                .filter(|(_, at, _)| at >= t)
                .map(|(s, _, _)| *s)
                .collect();
            prop_assert_eq!(seqs(&bus, Position::Time(*t), &all), want.clone(), "from time {}", t);
            for f in &filters {
                let filter = build_filter(f, &instances);
                let want: Vec<u64> = model
                    .entries
                    .iter()
                    .filter(|(_, at, e)| at >= t && model_matches(f, &instances, e))
                    .map(|(s, _, _)| *s)
                    .collect();
                prop_assert_eq!(seqs(&bus, Position::Time(*t), &filter), want, "from {} with {:?}", t, f);
            }
            // `until` stops before the first event appended after it.
            let want: Vec<u64> = model
                .entries
                .iter()
                .filter(|(_, at, _)| at <= t)
                .map(|(s, _, _)| *s)
                .collect();
            let got: Vec<u64> = bus
                .read(Position::Beginning, &all)
                .unwrap()
                .until(*t)
                .map(|e| e.unwrap().seq)
                .collect();
            prop_assert_eq!(got, want, "until {}", t);
        }
        // A durable subscription started at a time begins at the same
        // place, and seeking its cursor to a time lands there too.
        let t = model.entries[model.entries.len() / 2].1;
        let want: Vec<u64> = model.entries.iter().filter(|(_, at, _)| *at >= t).map(|(s, _, _)| *s).collect();
        let seen: Arc<Mutex<Vec<EventId>>> = Arc::default();
        let sub = bus
            .subscribe_durable("at-time", Filter::all(), Position::Time(t), recorder(&seen))
            .unwrap();
        prop_assert!(sub.wait_live(Duration::from_secs(10)));
        drop(sub);
        let got: Vec<u64> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|id| model.entries.iter().find(|(_, _, e)| e.id == *id).unwrap().0)
            .collect();
        prop_assert_eq!(got, want.clone());
        prop_assert_eq!(bus.seek("at-time", Position::Time(t)).unwrap().next_seq, want[0]);
        prop_assert_eq!(
            bus.seek("at-time", Position::Time(last + ns)).unwrap().next_seq,
            bus.last_seq() + 1
        );
    }

    #[test]
    fn positions_and_filters_match_the_model(
        batches in batches(),
        filters in proptest::collection::vec(filter_spec(), 1..6),
        picks in proptest::collection::vec(any::<prop::sample::Index>(), 1..4),
        limit in 0..6usize,
        applied in any::<prop::sample::Index>(),
    ) {
        let instances = [InstanceId::new(), InstanceId::new(), InstanceId::new(), InstanceId::new()];
        let (_dir, bus, model) = setup(&batches, &instances, applied.index(batches.len() + 1));
        let n = model.entries.len() as u64;
        for f in &filters {
            let filter = build_filter(f, &instances);
            let matching: Vec<u64> = model
                .entries
                .iter()
                .filter(|(_, _, e)| model_matches(f, &instances, e))
                .map(|(s, _, _)| *s)
                .collect();
            // The crate's own matcher agrees with the model.
            for (_, _, e) in &model.entries {
                prop_assert_eq!(filter.matches(e), model_matches(f, &instances, e), "{:?} on {:?}", f, e);
            }
            prop_assert_eq!(seqs(&bus, Position::Beginning, &filter), matching.clone());
            prop_assert!(seqs(&bus, Position::End, &filter).is_empty());
            for pick in &picks {
                let (seq, _, e) = &model.entries[pick.index(model.entries.len())];
                let want: Vec<u64> = matching.iter().copied().filter(|s| s >= seq).collect();
                prop_assert_eq!(seqs(&bus, Position::Seq(*seq), &filter), want.clone());
                prop_assert_eq!(seqs(&bus, Position::Id(e.id), &filter), want);
            }
            prop_assert!(seqs(&bus, Position::Seq(n + 1), &filter).is_empty());
            prop_assert_eq!(seqs(&bus, Position::Seq(0), &filter), matching.clone());
            // recent_events: the newest `limit` matching, oldest first.
            let recent: Vec<_> = bus.recent_events(limit, &filter).unwrap().into_iter().map(|e| e.id).collect();
            let want: Vec<_> = model
                .entries
                .iter()
                .filter(|(_, _, e)| model_matches(f, &instances, e))
                .map(|(_, _, e)| e.id)
                .collect();
            let want = want[want.len().saturating_sub(limit)..].to_vec();
            prop_assert_eq!(recent, want);
            // The JSON line writer agrees with the reader.
            let mut reader = bus.read(Position::Beginning, &filter).unwrap();
            let entries: Vec<_> = bus.read(Position::Beginning, &filter).unwrap().map(|e| e.unwrap()).collect();
            for entry in entries {
                let mut buf = Vec::new();
                let seq = reader.write_next_json(&mut buf).unwrap().unwrap();
                prop_assert_eq!(seq, entry.seq);
                prop_assert_eq!(String::from_utf8(buf).unwrap(), format!("{}\n", entry.to_json()));
            }
            prop_assert!(reader.write_next_json(&mut Vec::new()).is_none());
        }
    }
}
