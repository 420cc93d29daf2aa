//! Zero-filling the write-ahead log ahead of its frames, on a thread of its
//! own (`ctrlbus-wal-fill`).
//!
//! The WAL is preallocated with real zeros so that a frame overwrites
//! allocated blocks and its `fdatasync` flushes data only (`wal`). Growing
//! it on the commit path stalled every publisher behind writing megabytes
//! of zeros and an fsync: 8–10 ms, the slowest publish of a run on a fresh
//! log (BENCHMARKS.md, "Tail latency"). This thread fills the next
//! megabytes while the frames are still well inside the allocated part.
//!
//! Invariants:
//! - `allocated` only grows, and every byte below it is zeros or frames.
//! - Frames are written only below `allocated`; zeros only at or above it,
//!   under `fill`, whose holder alone may write past `allocated`. So zeros
//!   never land on a frame.
//! - The committer fills for itself (under `fill`) only when the thread
//!   has fallen behind; it then waits at most for one chunk of the thread's.
//! - The thread only ever writes zeros past the frames: if it fails or
//!   stops, nothing is lost, and the committer grows the file itself.
//! - On Linux with sync on, the thread writes whole pages of zeros past
//!   the page cache (`wal_direct::DirectZeros`), else buffered; either way
//!   it syncs them before publishing `allocated`.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use super::wal::WalIo;
#[cfg(target_os = "linux")]
pub(crate) use super::wal_direct::DirectZeros;
use crate::sync::{Condvar, Mutex};

/// Bytes the thread zero-fills (and syncs) at a time: what a frame's
/// `fdatasync` running beside it may have to flush with it. 256 KiB, not
/// 1 MiB: at 16 publishers the slowest 1% of publishes stayed as without
/// the thread (1 MiB made them 1.3-1.6x slower), BENCHMARKS.md. The WAL
/// asks for zeros in steps of it too.
pub(crate) const CHUNK: u64 = 256 << 10;

/// Zeros past the page cache: Linux only (`wal_direct`); elsewhere there
/// are none, and the thread writes its zeros buffered.
#[cfg(not(target_os = "linux"))]
pub(crate) enum DirectZeros {}

#[cfg(not(target_os = "linux"))]
impl DirectZeros {
    fn write(&mut self, _at: u64, _len: usize) -> io::Result<bool> {
        match *self {}
    }
}

/// What the committer asked for and whether to stop.
struct Want {
    /// Fill up to here.
    upto: u64,
    stop: bool,
}

struct State {
    /// Bytes known to be zero-filled or written (and, with sync, synced).
    allocated: AtomicU64,
    /// Held while zeros are written past `allocated`.
    fill: Mutex<()>,
    want: Mutex<Want>,
    wake: Condvar,
}

/// The zero-filling thread of one WAL file, stopped (and joined) on drop.
pub(crate) struct Ahead {
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
    /// The last `upto` asked for (to ask once per step).
    asked: u64,
}

impl Ahead {
    /// Starts the thread on `file` (a handle of the WAL's own), writing its
    /// zeros through `direct` when it can, the file being `allocated` bytes
    /// long. `None` if no thread can be started:
    /// the committer then grows the file itself.
    pub(crate) fn start(
        file: File,
        direct: Option<DirectZeros>,
        allocated: u64,
        sync: bool,
    ) -> Option<Ahead> {
        let state = Arc::new(State {
            allocated: AtomicU64::new(allocated),
            fill: Mutex::new(()),
            want: Mutex::new(Want {
                upto: allocated,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let s = state.clone();
        let thread = std::thread::Builder::new()
            .name("ctrlbus-wal-fill".into())
            .spawn(move || run(&s, file, direct, sync))
            .ok()?;
        Some(Ahead {
            state,
            thread: Some(thread),
            asked: allocated,
        })
    }

    /// Bytes zero-filled so far.
    pub(crate) fn allocated(&self) -> u64 {
        self.state.allocated.load(Ordering::Acquire)
    }

    /// The most the thread was asked to fill to.
    #[cfg(test)]
    pub(crate) fn asked(&self) -> u64 {
        self.asked
    }

    /// Asks for the file to be zero-filled up to `upto` bytes.
    pub(crate) fn ask(&mut self, upto: u64) {
        if upto <= self.asked {
            return;
        }
        self.asked = upto;
        let mut want = self.state.want.lock();
        want.upto = want.upto.max(upto);
        self.state.wake.notify_one();
    }

    /// Fills up to `target` with `fill_with` (the committer's own writes),
    /// unless the thread already has (waiting for the chunk it is
    /// writing); returns the bytes allocated, and whether `fill_with` had
    /// to write.
    pub(crate) fn fill_now(
        &self,
        target: u64,
        fill_with: impl FnOnce(u64, u64) -> io::Result<()>,
    ) -> io::Result<(u64, bool)> {
        let _fill = self.state.fill.lock();
        let at = self.state.allocated.load(Ordering::Acquire);
        if at >= target {
            return Ok((at, false));
        }
        fill_with(at, target)?;
        self.state.allocated.store(target, Ordering::Release);
        Ok((target, true))
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.state.want.lock().stop = true;
        self.state.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where a chunk of zeros from `at` ends: at the next whole chunk, or at
/// `upto`. A file of odd length (cut by a crash or by hand) is back on
/// page bounds after one chunk, so its zeros can go past the page cache
/// from then on.
fn chunk_end(at: u64, upto: u64) -> u64 {
    (at + 1).next_multiple_of(CHUNK).min(upto)
}

/// The thread: waits to be asked, then fills chunk by chunk, publishing
/// each once written (and synced).
fn run(state: &State, mut file: File, mut direct: Option<DirectZeros>, sync: bool) {
    let zeros = vec![0u8; CHUNK as usize];
    loop {
        let upto = {
            let mut want = state.want.lock();
            while !want.stop && want.upto <= state.allocated.load(Ordering::Acquire) {
                state.wake.wait(&mut want);
            }
            if want.stop {
                return;
            }
            want.upto
        };
        let step = (|| -> io::Result<()> {
            let _fill = state.fill.lock();
            let at = state.allocated.load(Ordering::Acquire);
            if at >= upto {
                return Ok(());
            }
            let end = chunk_end(at, upto);
            let len = (end - at) as usize;
            let written = match &mut direct {
                Some(d) => d.write(at, len)?,
                None => false,
            };
            if !written {
                // One `pwrite`: the committer's handle keeps its position.
                file.write_at(at, &zeros[..len])?;
            }
            if sync {
                WalIo::sync_all(&mut file)?;
            }
            state.allocated.store(end, Ordering::Release);
            Ok(())
        })();
        if let Err(e) = step {
            // The committer grows the file itself from here on.
            tracing::warn!(error = %e, "cannot zero-fill the write-ahead log ahead of its frames");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_for(ahead: &Ahead, bytes: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while ahead.allocated() < bytes {
            assert!(Instant::now() < deadline, "never filled");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn fills_what_is_asked_with_zeros_and_never_past_a_frame() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let file = File::create(&path).unwrap();
        let mut frames = file.try_clone().unwrap();
        let mut ahead = Ahead::start(file, None, 0, true).unwrap();
        ahead.ask(3 * CHUNK + 5);
        wait_for(&ahead, 3 * CHUNK + 5);
        // Exactly what was asked: a chunk at a time, the last one short.
        assert_eq!(ahead.allocated(), 3 * CHUNK + 5);
        // A "frame" below `allocated`, then more asked: it stays.
        frames.write_at(10, b"frame").unwrap();
        ahead.ask(4 * CHUNK);
        wait_for(&ahead, 4 * CHUNK);
        drop(ahead);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, 4 * CHUNK);
        assert_eq!(&bytes[10..15], b"frame");
        assert!(bytes[15..].iter().all(|b| *b == 0));
    }

    /// Zeros written past the page cache (then buffered, once the fill is
    /// no longer page-aligned) replace what the file held, up to what was
    /// asked and no further.
    #[cfg(target_os = "linux")]
    #[test]
    fn direct_zeros_overwrite_the_file_up_to_what_is_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let old = 5 * CHUNK as usize;
        std::fs::write(&path, vec![0xab; old]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let direct = DirectZeros::open(&path, &file, CHUNK as usize);
        let mut ahead = Ahead::start(file, direct, 0, true).unwrap();
        for upto in [CHUNK, 2 * CHUNK + 5, 4 * CHUNK] {
            ahead.ask(upto);
            wait_for(&ahead, upto);
        }
        drop(ahead);
        let bytes = std::fs::read(&path).unwrap();
        let filled = 4 * CHUNK as usize;
        assert_eq!(bytes.len(), old);
        assert!(
            bytes[..filled].iter().all(|b| *b == 0),
            "zeros up to what was asked"
        );
        assert!(
            bytes[filled..].iter().all(|b| *b == 0xab),
            "nothing past it"
        );
    }

    #[test]
    fn a_chunk_ends_on_a_whole_chunk_or_at_what_was_asked() {
        assert_eq!(chunk_end(0, 10 * CHUNK), CHUNK);
        assert_eq!(chunk_end(CHUNK, 10 * CHUNK), 2 * CHUNK);
        assert_eq!(chunk_end(CHUNK - 1, 10 * CHUNK), CHUNK);
        assert_eq!(chunk_end(2 * CHUNK + 5, 10 * CHUNK), 3 * CHUNK);
        assert_eq!(chunk_end(2 * CHUNK + 5, 2 * CHUNK + 9), 2 * CHUNK + 9);
    }

    #[test]
    fn the_committer_fills_for_itself_only_what_the_thread_has_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("w")).unwrap();
        let mut ahead = Ahead::start(file, None, 0, false).unwrap();
        ahead.ask(CHUNK);
        wait_for(&ahead, CHUNK);
        // Already there: nothing written.
        let got = ahead.fill_now(CHUNK / 2, |_, _| panic!("nothing to fill"));
        assert_eq!(got.unwrap(), (CHUNK, false));
        // Past it: from the end of what was filled.
        let mut asked = None;
        let got = ahead.fill_now(2 * CHUNK, |from, to| {
            asked = Some((from, to));
            Ok(())
        });
        assert_eq!(got.unwrap(), (2 * CHUNK, true));
        assert_eq!(asked, Some((CHUNK, 2 * CHUNK)));
        // A failed fill leaves `allocated` where it was.
        let got = ahead.fill_now(3 * CHUNK, |_, _| Err(io::Error::other("full")));
        assert!(got.is_err());
        assert_eq!(ahead.allocated(), 2 * CHUNK);
    }
}
