//! Allocating the redb file's blocks just ahead of redb's writes, on a
//! thread of its own (`ctrlbus-file-fill`).
//!
//! redb grows its file by doubling its length with `set_len`, which leaves
//! a hole: the applier's next commits then write into blocks that do not
//! exist yet, and each commit's `fdatasync` allocates them, writing the
//! block bitmaps and extent tree with its data. The WAL's syncs queue
//! behind all of that (one slow group per apply, most of the publish
//! tail). This backend wraps redb's `FileBackend` and writes zeros into the
//! hole a little ahead of the highest byte redb has written, and syncs
//! them, so that the commits overwrite blocks that are already there. At
//! 16 publishers that took the p99.9 of publishes to 0.65–0.92 of what it
//! was in 26 alternating rounds, at the same events/s within the noise
//! (BENCHMARKS.md, "Eighteenth session").
//!
//! Invariants:
//! - `high` only grows: no byte at or above it was written by redb in this
//!   process, and it starts at the file's length, so none in an earlier one.
//!   Every byte between `high` and the length is a zero (`set_len`'s
//!   contract), and stays one: the thread writes zeros only there.
//! - A redb write raises `high` past its end, under `mark`, before it
//!   writes; the thread checks and writes its zeros under `mark`. So zeros
//!   never land on a byte redb has written or is writing, and the file's
//!   contents are the same with or without the thread (a crash in the
//!   middle of a chunk leaves zeros, or a hole: zeros again).
//! - The thread never writes past the length redb set through this
//!   handle: `set_len` holds `mark` while it changes it. A handle whose
//!   open failed (another process writes the file) never set one, so its
//!   thread wrote nothing.
//! - If a write or a sync of the thread's fails, the thread stops; redb's
//!   own writes allocate as before, and nothing is lost.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::StorageBackend;
use redb::backends::FileBackend;

use crate::sync::{Condvar, Mutex};

/// Bytes zeroed and synced at a time: what a WAL sync running beside it may
/// have to flush with it (as the WAL's own fill, `wal_ahead::CHUNK`).
const CHUNK: u64 = 256 << 10;
/// How far past the highest byte redb wrote the thread keeps the file
/// allocated: many applies' worth (~620 KB each at 16 publishers), since
/// a commit's pages are not all just above it. 2 MiB took less off the
/// tail (p99.9 0.84–0.99 of none, against 0.67–0.92 at 8 MiB, 8 rounds
/// at 16 publishers), 32 MiB no more (BENCHMARKS.md). It is also the most
/// the file holds allocated ahead of what redb uses.
const AHEAD: u64 = 8 << 20;
/// The least time between two chunks, so that the thread never sends a
/// burst of syncs to the disk: at most 128 MiB/s, several times redb's
/// growth at 64 publishers.
const PAUSE: Duration = Duration::from_millis(2);

/// Where the thread writes and syncs its zeros: a clone of redb's handle,
/// or, in the tests, one whose writes or syncs fail.
trait Zeros: Send + 'static {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn sync_data(&self) -> io::Result<()>;
}

impl Zeros for File {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// What the thread and redb's writes share, under `State::mark`.
#[derive(Debug)]
struct Mark {
    /// No byte at or above it has been written by redb (see the module).
    high: u64,
    /// The file's length, as redb last set it.
    len: u64,
    /// Zeros are written from `high` up to here (the last chunk's sync
    /// may still be running).
    filled: u64,
    stop: bool,
}

impl Mark {
    /// The next chunk to zero, if one is wanted: whole chunks from `high`
    /// (or from where the zeros reach) up to `AHEAD` past it, inside the
    /// file.
    fn next_chunk(&self) -> Option<u64> {
        let start = self.filled.max(self.high).next_multiple_of(CHUNK);
        let end = start + CHUNK;
        (!self.stop && end <= self.len && end <= self.high + AHEAD).then_some(start)
    }
}

#[derive(Debug)]
struct State {
    mark: Mutex<Mark>,
    wake: Condvar,
}

/// redb's file backend, with the thread that allocates its blocks ahead
/// (stopped and joined on `close` or drop).
#[derive(Debug)]
pub(crate) struct AheadFile {
    inner: FileBackend,
    state: Arc<State>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl AheadFile {
    /// Wraps `file` (opened read and write) for redb, with a fill thread
    /// if one can be started.
    ///
    /// # Errors
    /// The file's length cannot be read, or the file cannot be cloned for
    /// the thread.
    pub(crate) fn new(file: File) -> io::Result<AheadFile> {
        // A clone shares the open file description, and so redb's locks
        // (open file description locks): closing it releases none.
        let zeros = file.try_clone()?;
        AheadFile::with_zeros(file, zeros)
    }

    /// As `new`, with the thread writing through `zeros`.
    fn with_zeros(file: File, zeros: impl Zeros) -> io::Result<AheadFile> {
        let len = file.metadata()?.len();
        let inner = FileBackend::new(file).map_err(io::Error::other)?;
        let state = Arc::new(State {
            mark: Mutex::new(Mark {
                high: len,
                len,
                filled: len,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let s = state.clone();
        let thread = std::thread::Builder::new()
            .name("ctrlbus-file-fill".into())
            .spawn(move || run(&s, &zeros))
            .ok();
        Ok(AheadFile {
            inner,
            state,
            thread: Mutex::new(thread),
        })
    }

    /// Stops the thread and waits for it.
    fn stop(&self) {
        self.state.mark.lock().stop = true;
        self.state.wake.notify_one();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    /// Wakes the thread if `mark` now wants a chunk.
    fn nudge(&self, mark: &Mark) {
        if mark.next_chunk().is_some() {
            self.state.wake.notify_one();
        }
    }
}

impl Drop for AheadFile {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread: waits for a chunk to be wanted, zeroes it under `mark`,
/// syncs it, pauses. Buffered, not past the page cache as the WAL's zeros:
/// redb's writes then land on cached pages (direct zeros gave 0.73–0.98x
/// the events/s at 64 publishers and no better tail, BENCHMARKS.md).
fn run(state: &State, file: &impl Zeros) {
    let zeros = vec![0u8; CHUNK as usize];
    loop {
        let mut mark = state.mark.lock();
        let start = loop {
            if mark.stop {
                return;
            }
            match mark.next_chunk() {
                Some(start) => break start,
                None => state.wake.wait(&mut mark),
            }
        };
        if let Err(e) = file.write_all_at(&zeros, start) {
            // redb's commits allocate their blocks themselves from here on.
            tracing::warn!(error = %e, "cannot allocate the log file ahead of its writes");
            return;
        }
        mark.filled = start + CHUNK;
        drop(mark);
        if let Err(e) = file.sync_data() {
            tracing::warn!(error = %e, "cannot allocate the log file ahead of its writes");
            return;
        }
        // Woken early by redb's writes, it still keeps its pause.
        let until = Instant::now() + PAUSE;
        let mut mark = state.mark.lock();
        while !mark.stop && !state.wake.wait_until(&mut mark, until).timed_out() {}
    }
}

impl StorageBackend for AheadFile {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut mark = self.state.mark.lock();
        let result = self.inner.set_len(len);
        // Whatever happened, the thread must not write past the smaller of
        // the two lengths.
        mark.len = match result {
            Ok(()) => len,
            Err(_) => mark.len.min(len),
        };
        mark.filled = mark.filled.min(mark.len);
        self.nudge(&mark);
        result
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        {
            let mut mark = self.state.mark.lock();
            mark.high = mark.high.max(offset.saturating_add(data.len() as u64));
            self.nudge(&mark);
        }
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.stop();
        self.inner.close()
    }

    forward_lock_methods!(inner);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::time::Instant;

    fn open(path: &std::path::Path) -> AheadFile {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        AheadFile::new(file).unwrap()
    }

    /// Waits until the thread's zeros reach `upto`.
    fn wait_filled(f: &AheadFile, upto: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while f.state.mark.lock().filled < upto {
            assert!(Instant::now() < deadline, "never filled to {upto}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn allocated(path: &std::path::Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn zeros_fill_the_hole_just_above_what_redb_wrote_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = open(&path);
        let len = 16 << 20;
        f.set_len(len).unwrap();
        f.write(0, &[0xab; 4096]).unwrap();
        let at = (1 << 20) + 100;
        f.write(at, b"redb's page").unwrap();
        let high = at + 11;
        // Whole chunks from the one above `high`, up to AHEAD past it.
        let from = high.next_multiple_of(CHUNK);
        let upto = (high + AHEAD) / CHUNK * CHUNK;
        wait_filled(&f, upto);
        std::thread::sleep(PAUSE * 5);
        assert_eq!(f.state.mark.lock().filled, upto, "no further than asked");
        f.close().unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len, "the length is redb's");
        assert!(bytes[..4096].iter().all(|b| *b == 0xab));
        assert_eq!(&bytes[at as usize..high as usize], b"redb's page");
        let zeros = |r: std::ops::Range<u64>| {
            bytes[r.start as usize..r.end as usize]
                .iter()
                .all(|b| *b == 0)
        };
        assert!(zeros(4096..at) && zeros(high..len), "zeros everywhere else");
        // The hole above `high` is allocated, the rest of it is not.
        let blocks = allocated(&path);
        assert!(blocks >= upto - from, "{blocks} bytes allocated");
        assert!(blocks < upto - from + (1 << 20), "{blocks} bytes allocated");
    }

    #[test]
    fn zeros_never_land_on_a_write_racing_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = Arc::new(open(&path));
        let len = 24 << 20;
        f.set_len(len).unwrap();
        // Pages written upwards with gaps, as redb's commits do, while the
        // thread zeroes ahead of them.
        let page = 16 << 10;
        let mut written = Vec::new();
        let mut at = 0;
        let mut n: u8 = 1;
        while at + page <= len - (4 << 20) {
            f.write(at, &vec![n; page as usize]).unwrap();
            written.push((at, n));
            at += page * (1 + u64::from(n % 3));
            n = n % 250 + 1;
            if n.is_multiple_of(16) {
                std::thread::sleep(Duration::from_micros(300));
            }
        }
        let high = f.state.mark.lock().high;
        wait_filled(&f, high.next_multiple_of(CHUNK) + CHUNK);
        f.close().unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        let mut expected = vec![0u8; len as usize];
        for (at, n) in &written {
            expected[*at as usize..(*at + page) as usize].fill(*n);
        }
        assert!(
            bytes == expected,
            "a page was zeroed, or zeros went elsewhere"
        );
    }

    #[test]
    fn the_thread_never_writes_past_a_length_redb_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = open(&path);
        f.set_len(2 * AHEAD).unwrap();
        f.write(0, &[1; 4096]).unwrap();
        wait_filled(&f, AHEAD);
        f.set_len(CHUNK + 10).unwrap();
        // Grown again: the zeros go on from `high`, inside the new length.
        std::thread::sleep(PAUSE * 5);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CHUNK + 10);
        f.set_len(2 * AHEAD).unwrap();
        f.write(3 * CHUNK, &[2; 10]).unwrap();
        wait_filled(&f, 3 * CHUNK + AHEAD);
        f.set_len(3 * CHUNK + 10).unwrap();
        std::thread::sleep(PAUSE * 5);
        f.close().unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, 3 * CHUNK + 10);
        assert!(bytes[..4096].iter().all(|b| *b == 1));
        assert!(bytes[4096..3 * CHUNK as usize].iter().all(|b| *b == 0));
        assert!(bytes[3 * CHUNK as usize..].iter().all(|b| *b == 2));
    }

    #[test]
    fn a_reopened_file_is_filled_only_above_its_old_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 * CHUNK as usize + 5]).unwrap();
        let f = open(&path);
        // Nothing redb wrote in this process yet: its old bytes are below
        // `high`, and the thread leaves them.
        f.set_len(2 * AHEAD).unwrap();
        wait_filled(&f, 3 * CHUNK + AHEAD);
        f.close().unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[..3 * CHUNK as usize + 5].iter().all(|b| *b == 7));
        assert!(bytes[3 * CHUNK as usize + 5..].iter().all(|b| *b == 0));
    }

    /// Zeros through a clone of the file, until the first `ok` writes (or
    /// syncs) have gone through: then every one fails as a full disk.
    struct Failing {
        file: File,
        sync: bool,
        ok: std::sync::atomic::AtomicU32,
    }

    impl Zeros for Failing {
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            if !self.sync {
                self.spend()?;
            }
            Zeros::write_all_at(&self.file, buf, offset)
        }

        fn sync_data(&self) -> io::Result<()> {
            if self.sync {
                self.spend()?;
            }
            Zeros::sync_data(&self.file)
        }
    }

    impl Failing {
        fn spend(&self) -> io::Result<()> {
            use std::sync::atomic::Ordering;
            let left = self.ok.load(Ordering::SeqCst);
            if left == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.ok.store(left - 1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// The thread's write (or sync) fails on its third chunk: it stops
    /// there for good, and redb's own writes, syncs and lengths go on.
    fn a_failed_fill_stops_the_thread_and_nothing_else(sync: bool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        let zeros = Failing {
            file: file.try_clone().unwrap(),
            sync,
            ok: 2.into(),
        };
        let f = AheadFile::with_zeros(file, zeros).unwrap();
        let len = 16 << 20;
        f.set_len(len).unwrap();
        f.write(0, &[1; 4096]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f.thread.lock().as_ref().unwrap().is_finished() {
            assert!(
                Instant::now() < deadline,
                "the thread goes on after a failure"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // From CHUNK: two chunks, and with syncs failing the third's write.
        let filled = CHUNK + if sync { 3 } else { 2 } * CHUNK;
        assert_eq!(f.state.mark.lock().filled, filled);
        // redb's writes above and below the zeros, a sync, a new length.
        f.write(CHUNK + 10, &[2; 10]).unwrap();
        f.write(8 << 20, &[3; 4096]).unwrap();
        f.sync_data().unwrap();
        f.set_len(2 * len).unwrap();
        f.write(2 * len - 4096, &[4; 4096]).unwrap();
        let mut back = [0u8; 10];
        f.read(CHUNK + 10, &mut back).unwrap();
        assert_eq!(back, [2; 10]);
        std::thread::sleep(PAUSE * 5);
        assert_eq!(f.state.mark.lock().filled, filled, "no zeros after it");
        f.close().unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        let mut expected = vec![0u8; 2 * len as usize];
        expected[..4096].fill(1);
        expected[CHUNK as usize + 10..CHUNK as usize + 20].fill(2);
        expected[8 << 20..(8 << 20) + 4096].fill(3);
        expected[2 * len as usize - 4096..].fill(4);
        assert!(
            bytes == expected,
            "a byte redb wrote, or its length, was lost"
        );
    }

    #[test]
    fn a_failed_zero_write_stops_the_thread_and_nothing_else() {
        a_failed_fill_stops_the_thread_and_nothing_else(false);
    }

    #[test]
    fn a_failed_zero_sync_stops_the_thread_and_nothing_else() {
        a_failed_fill_stops_the_thread_and_nothing_else(true);
    }

    #[test]
    fn close_stops_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = open(&path);
        // Chunks are wanted: the thread may have begun on them.
        f.set_len(8 << 20).unwrap();
        f.close().unwrap();
        assert!(f.thread.lock().is_none(), "joined");
        let (filled, blocks) = (f.state.mark.lock().filled, allocated(&path));
        // Nothing fills what is still wanted, nor what a later write wants.
        f.write(filled + 10, &[1; 10]).unwrap();
        std::thread::sleep(PAUSE * 5);
        assert_eq!(f.state.mark.lock().filled, filled);
        assert!(
            allocated(&path) <= blocks + (64 << 10),
            "no zeros after close"
        );
    }
}
