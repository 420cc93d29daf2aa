//! redb's file with its page writes past the page cache (`O_DIRECT`,
//! Linux), in runs of at most [`RUN_BYTES`].
//!
//! redb writes a commit's dirty pages into the page cache and then
//! `fdatasync`s the file, which hands the disk all of them at once: about
//! a MiB every `apply_interval` at 16 publishers. The WAL's `fdatasync`, on
//! the same disk, waits behind that whole burst, and the publishes it
//! acknowledges are the slow ones (BENCHMARKS.md, "Twelfth session").
//! Here the whole-page writes of a commit are held until redb syncs, then
//! written sorted, contiguous pages together, one direct write of at most
//! [`RUN_BYTES`] at a time, each finished before the next starts; a frame's
//! `fdatasync` waits for one run at most, and the commit's own `fdatasync`
//! is the disk's flush alone. At 16 publishers that took the p99.9 of a
//! publish from 2.2–2.4 ms to 1.5–1.6 ms at the same events/s
//! (BENCHMARKS.md, "Thirteenth session").
//!
//! Invariants:
//! - `pending` holds whole-page writes (offset and length multiples of
//!   [`PAGE`]) not yet on the file, with no two overlapping. Every other
//!   write (redb's header, 320 bytes at offset 0) goes through the buffered
//!   handle at once, after the pending writes it overlaps.
//! - A read, `set_len`, `sync_data` or `close` that could see a pending
//!   write writes the pending ones first, so redb reads what it wrote and
//!   its `sync_data` covers every write before it, as with a plain file.
//!   `pending` never holds more than [`MOST_PENDING`] (commits that don't
//!   sync, with `sync(false)`, write it out as it fills).
//! - A direct write of a range that is dirty in the page cache makes the
//!   kernel write that back first, and a buffered read after a direct write
//!   sees it: the two handles of the file never disagree.
//! - If the file system refuses direct I/O (tmpfs, some network file
//!   systems), at the open or at a write, the pages go through the buffered
//!   handle from then on: a refused write has written nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// The alignment of a direct write's offset, length and buffer (as
/// `wal_direct`): a multiple of every disk's logical block size.
const PAGE: usize = 4096;

/// The most one direct write carries. 256 KiB: against 64 KiB, 128 KiB and
/// 4 MiB, the same tail at 16 publishers with the fewest writes
/// (BENCHMARKS.md, "Thirteenth session").
pub(crate) const RUN_BYTES: usize = 256 << 10;

/// The most `pending` holds before it is written out without a sync.
const MOST_PENDING: usize = 8 << 20;

/// The whole-page writes not yet on the file, and the direct handle that
/// writes them.
struct Pending {
    /// `None` once the file system refused direct I/O.
    direct: Option<File>,
    /// By offset; none overlap.
    pages: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
    /// Grown as needed; a run is copied in from `start`, its first
    /// page-aligned byte.
    buf: Vec<u8>,
    start: usize,
}

impl Pending {
    /// True when a pending write overlaps `[offset, offset + len)`.
    fn overlaps(&self, offset: u64, len: usize) -> bool {
        let end = offset + len as u64;
        self.pages
            .range(..end)
            .next_back()
            .is_some_and(|(&at, data)| at + data.len() as u64 > offset)
    }

    /// Writes every pending page to the file, in runs.
    fn write_out(&mut self, buffered: &FileBackend) -> io::Result<()> {
        let pages = std::mem::take(&mut self.pages);
        self.bytes = 0;
        let mut run: Vec<&[u8]> = Vec::new();
        let (mut run_at, mut run_len) = (0u64, 0usize);
        for (&at, data) in &pages {
            let joins = run_at + run_len as u64 == at && run_len + data.len() <= RUN_BYTES;
            if run_len > 0 && !joins {
                self.write_run(buffered, run_at, &run, run_len)?;
                run.clear();
                run_len = 0;
            }
            if run_len == 0 {
                run_at = at;
            }
            run.push(data);
            run_len += data.len();
        }
        if run_len > 0 {
            self.write_run(buffered, run_at, &run, run_len)?;
        }
        Ok(())
    }

    /// Writes the contiguous `parts` (`len` bytes in all) at `at`: direct
    /// from the aligned buffer, or buffered once direct I/O is refused.
    fn write_run(
        &mut self,
        buffered: &FileBackend,
        at: u64,
        parts: &[&[u8]],
        len: usize,
    ) -> io::Result<()> {
        if let Some(direct) = &self.direct {
            if self.buf.len() < self.start + len {
                self.buf = vec![0u8; len.next_power_of_two().max(64 << 10) + PAGE];
                // The address only picks the offset; nothing is read through it.
                let addr = self.buf.as_ptr() as usize;
                self.start = (PAGE - addr % PAGE) % PAGE;
            }
            let mut pos = self.start;
            for part in parts {
                self.buf[pos..pos + part.len()].copy_from_slice(part);
                pos += part.len();
            }
            match direct.write_all_at(&self.buf[self.start..pos], at) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(error = %e, "writing the log's file buffered: direct I/O refused");
                    self.direct = None;
                    self.buf = Vec::new();
                }
                Err(e) => return Err(e),
            }
        }
        let mut at = at;
        for part in parts {
            buffered.write(at, part)?;
            at += part.len() as u64;
        }
        Ok(())
    }
}

/// redb's [`FileBackend`] with its whole-page writes made direct, in runs.
pub(crate) struct DirectBackend {
    buffered: FileBackend,
    pending: Mutex<Pending>,
    /// True while `pending` holds a page: reads skip the lock otherwise.
    any_pending: AtomicBool,
}

impl std::fmt::Debug for DirectBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectBackend")
    }
}

impl DirectBackend {
    /// Opens the existing file at `path` for redb, with a direct handle
    /// beside the buffered one when the file system allows it.
    ///
    /// # Errors
    /// The buffered open's I/O error (a refused direct open is not one).
    pub(crate) fn open(path: &Path) -> io::Result<DirectBackend> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let direct = open_direct(path, &file);
        let buffered = FileBackend::new(file).map_err(io::Error::other)?;
        Ok(DirectBackend {
            buffered,
            pending: Mutex::new(Pending {
                direct,
                pages: BTreeMap::new(),
                bytes: 0,
                buf: Vec::new(),
                start: 0,
            }),
            any_pending: AtomicBool::new(false),
        })
    }

    /// Writes the pending pages out if any overlaps `[offset, offset + len)`
    /// (every one when `len` is `usize::MAX`).
    fn write_out_if(&self, offset: u64, len: usize) -> io::Result<()> {
        if !self.any_pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut p = self.pending.lock();
        if len == usize::MAX || p.overlaps(offset, len) {
            self.any_pending.store(false, Ordering::Release);
            p.write_out(&self.buffered)?;
        }
        Ok(())
    }
}

/// Opens `path` (the file `same` is, already open) for direct writes;
/// `None` if the file system refuses, or if `path` is no longer that file.
fn open_direct(path: &Path, same: &File) -> Option<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()?;
    let (a, b) = (file.metadata().ok()?, same.metadata().ok()?);
    ((a.dev(), a.ino()) == (b.dev(), b.ino())).then_some(file)
}

impl StorageBackend for DirectBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.buffered.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.write_out_if(offset, out.len())?;
        self.buffered.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.write_out_if(0, usize::MAX)?;
        self.buffered.set_len(len)
    }
    fn sync_data(&self) -> Result<(), io::Error> {
        self.write_out_if(0, usize::MAX)?;
        self.buffered.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut p = self.pending.lock();
        if p.overlaps(offset, data.len()) {
            self.any_pending.store(false, Ordering::Release);
            p.write_out(&self.buffered)?;
        }
        let whole = offset.is_multiple_of(PAGE as u64) && data.len().is_multiple_of(PAGE);
        if whole && p.direct.is_some() {
            p.pages.insert(offset, data.to_vec());
            p.bytes += data.len();
            if p.bytes > MOST_PENDING {
                self.any_pending.store(false, Ordering::Release);
                p.write_out(&self.buffered)?;
            } else {
                self.any_pending.store(true, Ordering::Release);
            }
            return Ok(());
        }
        drop(p);
        self.buffered.write(offset, data)
    }
    fn close(&self) -> Result<(), io::Error> {
        self.write_out_if(0, usize::MAX)?;
        self.buffered.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.buffered.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.buffered.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.buffered.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.buffered.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.buffered.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.buffered.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` zero bytes in `dir`, opened through the backend.
    fn backend_in(dir: &Path, len: u64) -> (tempfile::TempDir, std::path::PathBuf, DirectBackend) {
        let tmp = tempfile::tempdir_in(dir).unwrap();
        let path = tmp.path().join("log.redb");
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        let backend = DirectBackend::open(&path).unwrap();
        (tmp, path, backend)
    }

    fn page(fill: u8, pages: usize) -> Vec<u8> {
        vec![fill; pages * PAGE]
    }

    fn direct_in_use(b: &DirectBackend) -> bool {
        b.pending.lock().direct.is_some()
    }

    #[test]
    fn pages_written_in_any_order_read_back_and_reach_the_file_sorted_in_runs() {
        let (_tmp, path, b) = backend_in(&std::env::temp_dir(), 2 << 20);
        let mut want = vec![0u8; 2 << 20];
        // 100 contiguous pages (more than one run) written last to first,
        // a gap, then a few apart.
        let mut writes: Vec<(u64, Vec<u8>)> = (0..100)
            .rev()
            .map(|i| ((PAGE * (i + 1)) as u64, page(i as u8 + 1, 1)))
            .collect();
        writes.push(((PAGE * 200) as u64, page(0xaa, 8)));
        writes.push(((PAGE * 150) as u64, page(0xbb, 2)));
        for (at, data) in &writes {
            b.write(*at, data).unwrap();
            want[*at as usize..*at as usize + data.len()].copy_from_slice(data);
        }
        assert!(b.any_pending.load(Ordering::Acquire));
        // A read of a pending page sees it (and writes them out).
        let mut out = vec![0u8; PAGE];
        b.read((PAGE * 7) as u64, &mut out).unwrap();
        assert_eq!(out, page(7, 1));
        b.write((PAGE * 300) as u64, &page(0xcc, 1)).unwrap();
        want[PAGE * 300..PAGE * 301].copy_from_slice(&page(0xcc, 1));
        b.sync_data().unwrap();
        assert!(!b.any_pending.load(Ordering::Acquire));
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[test]
    fn a_short_write_over_a_pending_page_lands_after_it() {
        // redb's header: 320 bytes at offset 0, over the page it also
        // writes whole. Written before the pending page, it would be lost.
        let (_tmp, path, b) = backend_in(&std::env::temp_dir(), 64 << 10);
        b.write(0, &page(1, 1)).unwrap();
        b.write(0, &[9u8; 320]).unwrap();
        b.sync_data().unwrap();
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[..320], &[9u8; 320][..]);
        assert!(file[320..PAGE].iter().all(|&x| x == 1));
    }

    #[test]
    fn a_write_over_part_of_a_pending_write_wins() {
        let (_tmp, path, b) = backend_in(&std::env::temp_dir(), 64 << 10);
        b.write(PAGE as u64 * 2, &page(1, 2)).unwrap();
        b.write(PAGE as u64 * 3, &page(2, 1)).unwrap();
        b.write(PAGE as u64 * 2, &page(3, 1)).unwrap();
        b.sync_data().unwrap();
        let file = std::fs::read(&path).unwrap();
        assert!(file[PAGE * 2..PAGE * 3].iter().all(|&x| x == 3));
        assert!(file[PAGE * 3..PAGE * 4].iter().all(|&x| x == 2));
    }

    #[test]
    fn a_shrink_after_pending_pages_keeps_the_file_at_its_new_length() {
        // Pages past the new length written after the shrink would grow
        // the file again.
        let (_tmp, path, b) = backend_in(&std::env::temp_dir(), 64 << 10);
        b.write(PAGE as u64 * 10, &page(5, 1)).unwrap();
        b.set_len(PAGE as u64 * 4).unwrap();
        b.sync_data().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), PAGE as u64 * 4);
    }

    #[test]
    fn writes_without_a_sync_are_held_up_to_the_bound_then_written() {
        // Commits that don't sync (`sync(false)` without a WAL) must not
        // pile up pages in memory.
        let (_tmp, path, b) = backend_in(&std::env::temp_dir(), 16 << 20);
        let pages = (MOST_PENDING / PAGE) + 1;
        for i in 0..pages {
            b.write((i * PAGE) as u64, &page((i % 250) as u8 + 1, 1))
                .unwrap();
            assert!(b.pending.lock().bytes <= MOST_PENDING);
        }
        assert!(!b.any_pending.load(Ordering::Acquire));
        let file = std::fs::read(&path).unwrap();
        for i in [0, pages / 2, pages - 1] {
            assert!(
                file[i * PAGE..(i + 1) * PAGE]
                    .iter()
                    .all(|&x| x == (i % 250) as u8 + 1)
            );
        }
    }

    #[test]
    fn with_direct_io_refused_every_write_goes_buffered() {
        // As after a refused open or a write refused with EINVAL (tmpfs
        // takes O_DIRECT on recent kernels, so no file system here refuses).
        let (_tmp, path, b) = backend_in(&std::env::temp_dir(), 64 << 10);
        b.pending.lock().direct = None;
        b.write(PAGE as u64, &page(4, 1)).unwrap();
        assert!(!b.any_pending.load(Ordering::Acquire));
        assert!(b.pending.lock().pages.is_empty());
        let mut out = vec![0u8; PAGE];
        b.read(PAGE as u64, &mut out).unwrap();
        assert_eq!(out, page(4, 1));
        b.sync_data().unwrap();
        assert_eq!(
            &std::fs::read(&path).unwrap()[PAGE..PAGE * 2],
            &page(4, 1)[..]
        );
    }

    #[test]
    fn a_log_on_a_file_system_that_takes_direct_io_uses_it() {
        let (_tmp, _path, b) = backend_in(&std::env::temp_dir(), 64 << 10);
        let fs_takes_it = {
            let probe = tempfile::NamedTempFile::new().unwrap();
            open_direct(probe.path(), probe.as_file()).is_some()
        };
        assert_eq!(direct_in_use(&b), fs_takes_it);
    }
}
