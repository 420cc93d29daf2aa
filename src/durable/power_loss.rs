//! Power-loss tests (G2, G3, G8, G10): kill -9 keeps the page cache, so it
//! can't show an fsync that is missing or in the wrong order. Here both of
//! the log's files go through a simulated disk:
//!
//! - redb's file through a [`redb::StorageBackend`] wrapper, and the WAL
//!   through its file layer ([`WalIo`]);
//! - every write reaches the real file (the page cache) and a page-sized
//!   record of it; the "disk" image of a file changes only when it is
//!   synced;
//! - a power cut freezes both files (every later write and sync fails) and
//!   replaces each with its disk image plus, for every page written since
//!   its last sync, either nothing, the whole page, or a random prefix of it
//!   (a torn write); a file's length is metadata and survives whole, as the
//!   synced length or the newest one;
//! - the log is then reopened by the ordinary `DurableBus::open`, and every
//!   acknowledged event must be there with its `seq`, the `seq`s without a
//!   gap, `check` clean, the durable cursor present, and exactly one delivery
//!   record per event for the webhook that matches them all.
//!
//! Rounds follow each other on the same log (a recovery is itself cut
//! later). `CTRLBUS_POWER_LOSS_ROUNDS` sets how many (default 12); the seed
//! of each round is printed on failure.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::StorageBackend;
use redb::backends::FileBackend;

use super::wal::{WalIo, WalIoWrap};
use super::{DurableBus, DurableBusBuilder};
use crate::bus::Bus;
use crate::error::{HandlerError, PublishError, StorageError};
use crate::event::{Event, Type};
use crate::filter::Filter;
use crate::id::EventId;
use crate::webhook::{DeliveryQuery, NewWebhook};

const PAGE: usize = 4096;

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One file as the page cache and the disk hold it.
#[derive(Default)]
struct SimFile {
    /// What a reader sees (the page cache): also in the real file.
    cached: Vec<u8>,
    /// What survives a power cut whole: the file as of its last sync.
    disk: Vec<u8>,
    /// Pages written since the last sync.
    dirty: BTreeSet<usize>,
}

impl SimFile {
    fn write(&mut self, at: usize, data: &[u8]) {
        if self.cached.len() < at + data.len() {
            self.cached.resize(at + data.len(), 0);
        }
        self.cached[at..at + data.len()].copy_from_slice(data);
        if !data.is_empty() {
            self.dirty.extend(at / PAGE..=(at + data.len() - 1) / PAGE);
        }
    }

    fn set_len(&mut self, len: usize) {
        let old = self.cached.len();
        self.cached.resize(len, 0);
        if len > old {
            self.dirty.extend(old / PAGE..=(len - 1) / PAGE);
        }
    }

    fn sync(&mut self) {
        self.disk.resize(self.cached.len(), 0);
        for &p in &self.dirty {
            let (from, to) = (p * PAGE, ((p + 1) * PAGE).min(self.cached.len()));
            if from < to {
                self.disk[from..to].copy_from_slice(&self.cached[from..to]);
            }
        }
        self.disk.truncate(self.cached.len());
        self.dirty.clear();
    }

    /// The file after a power cut. Its length is metadata, kept whole: the
    /// synced one or the newest one, never in between. Its contents are the
    /// disk image (zeros where it never held data), and of each unsynced
    /// page nothing, all of it, or a prefix of it (a torn write).
    fn after_cut(&self, rng: &mut Rng) -> Vec<u8> {
        let len = if rng.below(2) == 0 {
            self.disk.len()
        } else {
            self.cached.len()
        };
        let mut img = self.disk.clone();
        img.resize(len, 0);
        for &p in &self.dirty {
            let from = p * PAGE;
            let to = ((p + 1) * PAGE).min(len);
            if from >= to {
                continue;
            }
            let keep = match rng.below(3) {
                0 => 0,
                1 => to - from,
                _ => rng.below((to - from) as u64) as usize,
            };
            img[from..from + keep].copy_from_slice(&self.cached[from..from + keep]);
        }
        img
    }
}

/// Every simulated file, by path, and whether the power is off.
#[derive(Default)]
struct DiskState {
    files: HashMap<PathBuf, SimFile>,
    off: bool,
    /// A write of the WAL's header fails (a disk error, the power on).
    header_writes_fail: bool,
}

#[derive(Clone, Default)]
struct Disk(Arc<Mutex<DiskState>>);

fn power_off() -> io::Error {
    io::Error::other("simulated power loss")
}

impl Disk {
    /// Starts tracking `path` as it is now (its content counts as synced).
    fn track(&self, path: &Path) {
        let content = std::fs::read(path).unwrap_or_default();
        self.0.lock().unwrap().files.insert(
            path.to_path_buf(),
            SimFile {
                cached: content.clone(),
                disk: content,
                dirty: BTreeSet::new(),
            },
        );
    }

    /// Runs `f` on the file's record and then `real` on the real file,
    /// both under the disk's lock, unless the power is off.
    fn op<T>(
        &self,
        path: &Path,
        f: impl FnOnce(&mut SimFile),
        real: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let mut st = self.0.lock().unwrap();
        if st.off {
            return Err(power_off());
        }
        f(st.files.get_mut(path).expect("a tracked file"));
        real()
    }

    /// Cuts the power: nothing more reaches a file. Returns each file's
    /// content after the cut.
    fn cut(&self, rng: &mut Rng) -> Vec<(PathBuf, Vec<u8>)> {
        let mut st = self.0.lock().unwrap();
        st.off = true;
        let mut out: Vec<_> = st
            .files
            .iter()
            .map(|(p, f)| (p.clone(), f.after_cut(rng)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// redb's file on the simulated disk.
#[derive(Debug)]
struct SimBackend {
    inner: FileBackend,
    path: PathBuf,
    disk: DiskHandle,
}

/// `Disk` for a `Debug` field.
#[derive(Clone)]
struct DiskHandle(Disk);

impl std::fmt::Debug for DiskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Disk")
    }
}

impl StorageBackend for SimBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.disk.0.op(
            &self.path,
            |f| f.set_len(len as usize),
            || self.inner.set_len(len),
        )
    }
    fn sync_data(&self) -> Result<(), io::Error> {
        // The real file needs no fsync: only the simulated disk counts.
        self.disk.0.op(&self.path, SimFile::sync, || Ok(()))
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.disk.0.op(
            &self.path,
            |f| f.write(offset as usize, data),
            || self.inner.write(offset, data),
        )
    }
    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }
    forward_lock_methods!(inner);
}

/// The WAL's file on the simulated disk.
struct SimWal {
    file: File,
    path: PathBuf,
    disk: Disk,
}

impl WalIo for SimWal {
    fn len(&mut self) -> io::Result<u64> {
        self.file.len()
    }
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.file.read_at(pos, buf)
    }
    fn write_at(&mut self, pos: u64, data: &[u8]) -> io::Result<()> {
        if pos == 0 && self.disk.0.lock().unwrap().header_writes_fail {
            return Err(io::Error::other("simulated write error"));
        }
        let file = &mut self.file;
        self.disk.op(
            &self.path,
            |f| f.write(pos as usize, data),
            || file.write_at(pos, data),
        )
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let file = &mut self.file;
        self.disk.op(
            &self.path,
            |f| f.set_len(len as usize),
            || file.set_len(len),
        )
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.disk.op(&self.path, SimFile::sync, || Ok(()))
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

/// How a chain of rounds configures the log.
#[derive(Clone, Copy)]
struct Config {
    /// WAL bytes after which the WAL restarts.
    restart_bytes: u64,
    apply_interval: Duration,
}

/// Opens the log at `path` with both files on `disk`.
fn open_on(disk: &Disk, path: &Path, config: Config) -> DurableBus {
    crate::files::ensure_exists(path).unwrap();
    disk.track(path);
    let wal_path = super::wal::path_for(path);
    let (wal_disk, tracked) = (disk.clone(), wal_path.clone());
    let wrap = WalIoWrap(Arc::new(move |file: File| -> Box<dyn WalIo> {
        wal_disk.track(&tracked);
        Box::new(SimWal {
            file,
            path: tracked.clone(),
            disk: wal_disk.clone(),
        })
    }));
    let mut builder = DurableBusBuilder::default();
    builder.opts.wal_io = Some(wrap);
    builder.opts.wal_restart_bytes = config.restart_bytes;
    builder.opts.apply_interval = config.apply_interval;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let backend = SimBackend {
        inner: FileBackend::new(file).unwrap(),
        path: path.to_path_buf(),
        disk: DiskHandle(disk.clone()),
    };
    builder.open_backend_with_wal(path, backend).unwrap()
}

/// What the rounds carry from one to the next.
#[derive(Default)]
struct Expect {
    /// Every acknowledged event, by `seq`.
    acked: HashMap<u64, EventId>,
    cursor_made: bool,
    hook_made: bool,
}

/// Checks that `bus`, just reopened after a cut, holds everything `expect`
/// says survived.
fn verify(bus: &DurableBus, expect: &Expect, seed: u64) {
    let mut last = 0;
    let mut seen: HashMap<u64, EventId> = HashMap::new();
    for entry in bus
        .read(super::Position::Beginning, &Filter::all())
        .unwrap()
    {
        let entry = entry.unwrap_or_else(|e| panic!("seed {seed}: unreadable: {e}"));
        assert_eq!(
            entry.seq,
            last + 1,
            "seed {seed}: a gap before {}",
            entry.seq
        );
        last = entry.seq;
        seen.insert(entry.seq, entry.event.id);
    }
    for (seq, id) in &expect.acked {
        assert_eq!(
            seen.get(seq),
            Some(id),
            "seed {seed}: acknowledged seq {seq} lost or changed"
        );
    }
    let report = bus.check(&mut |_, _| {}).unwrap();
    assert!(report.is_sound(), "seed {seed}: {:?}", report.problems);
    if expect.cursor_made {
        bus.cursor("audit")
            .unwrap_or_else(|e| panic!("seed {seed}: cursor lost: {e}"));
    }
    if expect.hook_made {
        let deliveries = bus
            .webhooks()
            .deliveries(&DeliveryQuery::default())
            .unwrap();
        let mut per_seq: HashMap<u64, usize> = HashMap::new();
        for d in &deliveries {
            *per_seq.entry(d.seq).or_default() += 1;
        }
        for seq in seen.keys() {
            assert_eq!(
                per_seq.get(seq),
                Some(&1),
                "seed {seed}: seq {seq} has no single delivery record"
            );
        }
        assert_eq!(deliveries.len(), seen.len(), "seed {seed}");
    }
}

/// One round: open on the simulated disk (recovering the last cut, itself
/// cut later), verify, publish from three threads, cut the power at a
/// random moment, and write the files as they survive.
fn round(path: &Path, expect: &mut Expect, seed: u64, config: Config) {
    let mut rng = Rng(seed | 1);
    let disk = Disk::default();
    let bus = open_on(&disk, path, config);
    verify(&bus, expect, seed);
    if !expect.hook_made {
        bus.webhooks()
            .allow_private_targets(true)
            .create(NewWebhook {
                tenant_id: "acme".into(),
                url: "http://127.0.0.1:9/hook".into(),
                events: vec![],
                secret: None,
            })
            .unwrap();
        expect.hook_made = true;
    }
    let handled = Arc::new(AtomicU64::new(0));
    let counter = handled.clone();
    let sub = bus
        .subscribe_durable(
            "audit",
            Filter::all(),
            super::Position::Beginning,
            move |_: &Event| -> Result<(), HandlerError> {
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
        )
        .unwrap();
    expect.cursor_made = true;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..3)
        .map(|t| {
            let (bus, acked, stop) = (bus.clone(), acked.clone(), stop.clone());
            let disk = disk.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let result = if t == 2 && i.is_multiple_of(4) {
                        let batch = (0..5)
                            .map(|_| Event::new(Type::DEPLOY_STARTED, "acme"))
                            .collect();
                        bus.publish_batch(batch)
                    } else {
                        bus.publish(
                            Event::new(Type::DEPLOY_STARTED, "acme").with_payload_value("i", i),
                        )
                        .map(|r| vec![r])
                    };
                    match result {
                        Ok(receipts) => acked
                            .lock()
                            .unwrap()
                            .extend(receipts.iter().map(|r| (r.seq, r.id))),
                        Err(e) => {
                            // Only the cut may fail a publish.
                            assert!(
                                disk.0.lock().unwrap().off,
                                "a publish failed with the power on (seed {seed}): {e}"
                            );
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(5 + rng.below(40)));
    let images = disk.cut(&mut rng);
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.join().unwrap();
    }
    drop(sub);
    drop(bus);
    for (file, content) in images {
        std::fs::write(&file, content).unwrap();
    }
    expect.acked.extend(acked.lock().unwrap().iter().copied());
}

#[test]
fn power_loss_keeps_every_acknowledged_event() {
    let defaults = super::Options::default();
    rounds(Config {
        restart_bytes: defaults.wal_restart_bytes,
        apply_interval: defaults.apply_interval,
    });
}

/// The same with the WAL restarting every 4 KiB and applies every 2 ms: a
/// round then cuts the power in every state of a restart that carries
/// unapplied frames (the carrying header, new frames below the carried
/// ones, a publish waiting for the applier to make room, the header that
/// ends the carry).
#[test]
fn power_loss_keeps_every_acknowledged_event_across_carrying_restarts() {
    rounds(Config {
        restart_bytes: 4 << 10,
        apply_interval: Duration::from_millis(2),
    });
}

/// A WAL restart whose header write fails poisons the log, and the group
/// that asked for the restart fails with it: acknowledged, its frame
/// would be of a generation the header on disk does not name, and gone
/// after a power cut.
#[test]
fn a_failed_wal_restart_fails_its_group_rather_than_acknowledging_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let disk = Disk::default();
    // Restarts every 4 KiB, nothing applied meanwhile.
    let bus = open_on(
        &disk,
        &path,
        Config {
            restart_bytes: 4 << 10,
            apply_interval: Duration::from_secs(3600),
        },
    );
    disk.0.lock().unwrap().header_writes_fail = true;
    let mut expect = Expect::default();
    let mut failed = None;
    for i in 0..1_000u64 {
        match bus.publish(Event::new(Type::DEPLOY_STARTED, "acme").with_payload_value("i", i)) {
            Ok(r) => {
                expect.acked.insert(r.seq, r.id);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let failed = failed.expect("a restart was due within 1,000 events");
    assert!(
        matches!(
            failed,
            PublishError::Storage(StorageError::Poisoned | StorageError::CommitFailed { .. })
        ),
        "{failed}"
    );
    let images = disk.cut(&mut Rng(0x5eed));
    drop(bus);
    for (file, content) in images {
        std::fs::write(&file, content).unwrap();
    }
    let bus = DurableBus::open(&path).unwrap();
    verify(&bus, &expect, 0x5eed);
}

fn rounds(config: Config) {
    // A log takes up to CHAIN cuts in a row, then a new one starts, so a
    // round's checks (the whole log) stay bounded however many rounds run.
    const CHAIN: u64 = 20;
    let rounds: u64 = std::env::var("CTRLBUS_POWER_LOSS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let base: u64 = std::env::var("CTRLBUS_POWER_LOSS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let mut acked = 0;
    for chain in 0..rounds.div_ceil(CHAIN) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let mut expect = Expect::default();
        for r in chain * CHAIN..((chain + 1) * CHAIN).min(rounds) {
            let seed = base.wrapping_add(r.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            round(&path, &mut expect, seed, config);
        }
        // And through the ordinary open, on the real files.
        let bus = DurableBus::open(&path).unwrap();
        verify(&bus, &expect, base);
        acked += expect.acked.len() as u64;
    }
    assert!(
        acked > rounds,
        "the rounds acknowledged too little to mean anything: {acked}"
    );
    eprintln!("power loss: {rounds} rounds, {acked} acknowledged events, all kept");
}
