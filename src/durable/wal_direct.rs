//! Writing the write-ahead log's frames past the page cache (`O_DIRECT`,
//! Linux, with sync on).
//!
//! A buffered frame is copied into the page cache, and its `fdatasync`
//! then starts the writeback and waits for it and for the disk's cache
//! flush. Written with `O_DIRECT`, the frame goes to the disk in the
//! `pwrite` itself, and the `fdatasync` after it is the flush alone. On
//! this machine's disk fio gave 6,200–6,500 write+`fdatasync`/s that way
//! against 5,500–5,600 buffered, and the `fdatasync`'s p99.9 fell from
//! 430–780 µs to 230–250 µs (BENCHMARKS.md, "Ninth session").
//!
//! A direct write covers whole pages, at a page-aligned offset, from a
//! page-aligned buffer. A frame starts where the last one ended, usually
//! inside a page: that page's earlier bytes (the end of the frame before)
//! are written again, from a copy of the last page written (`tail`), or
//! read back from the file when there is none (after a reopen), with the
//! same bytes, as the buffered write-back of that page would write it. The
//! bytes after the frame, up to the page's end, are written as zeros:
//! past the last frame there is nothing a recovery keeps (zeros, or
//! frames of older generations, which it refuses).
//!
//! The zero-filling thread (`wal_ahead`) writes its zeros the same way
//! (`DirectZeros`), so that no dirty page of them is left for a frame's
//! `fdatasync`, which covers the whole file, to write back.
//!
//! Invariants:
//! - `tail` holds the bytes of the file from `tail_at` (page-aligned) up to
//!   the end of the last frame written, which is less than a page past it.
//! - Frames go through their handle only below the zero-filled part
//!   (`Wal::allocated`), rounded up to a page; zeros go through theirs (or
//!   the buffered handle) only at or past it, and are synced before
//!   `allocated` covers them; the buffered handle writes the header (page
//!   0). So no page a frame is written to is dirty in the page cache.
//! - If the file system refuses direct I/O (tmpfs, some network file
//!   systems) at the open or at a write, frames are written buffered from
//!   then on, as without this module: a refused write has written nothing.

use std::fs::File;
use std::io;
use std::path::Path;

use super::wal::WalIo;

/// The alignment of a direct write's offset, length and buffer: 4 KiB, a
/// multiple of the logical block size of every disk in use (512 or 4096).
const PAGE: usize = 4096;

/// Opens `path` (the file `same` is, already open and locked) for direct
/// writes; `None` if the file system refuses, or if `path` is no longer the
/// file `same` is (replaced since).
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

/// A buffer of `len` zero bytes at a page-aligned address, for direct
/// writes: the vector, and where in it the aligned bytes start.
fn aligned_zeros(len: usize) -> (Vec<u8>, usize) {
    let buf = vec![0u8; len + PAGE];
    // The address only picks the offset; nothing is read through it.
    let addr = buf.as_ptr() as usize;
    let start = (PAGE - addr % PAGE) % PAGE;
    (buf, start)
}

/// The zero-filling thread's own direct handle of the WAL (`wal_ahead`).
/// Its zeros then leave no dirty pages behind for a frame's `fdatasync` to
/// write back with the frame (that `fdatasync` covers the whole file):
/// alternating release builds, 10 rounds of 100k events at 16 publishers,
/// medians, +7% events/s and -12% p99.9 (BENCHMARKS.md, "Ninth session").
pub(crate) struct DirectZeros {
    file: File,
    zeros: Vec<u8>,
    start: usize,
}

impl DirectZeros {
    /// As [`open_direct`], for writes of up to `most` zeros at a time.
    pub(crate) fn open(path: &Path, same: &File, most: usize) -> Option<DirectZeros> {
        let file = open_direct(path, same)?;
        let (zeros, start) = aligned_zeros(most.next_multiple_of(PAGE));
        Some(DirectZeros { file, zeros, start })
    }

    /// Writes `len` zeros at `at` when both are whole pages and `len` is at
    /// most what it was opened for; `Ok(false)` when it can't (and has
    /// written nothing), for the caller to write them buffered: unaligned,
    /// too long, or direct I/O refused (then it always answers so).
    pub(crate) fn write(&mut self, at: u64, len: usize) -> io::Result<bool> {
        let fits = self.start + len <= self.zeros.len();
        if self.zeros.is_empty()
            || !fits
            || !at.is_multiple_of(PAGE as u64)
            || !len.is_multiple_of(PAGE)
        {
            return Ok(false);
        }
        let zeros = &self.zeros[self.start..self.start + len];
        match std::os::unix::fs::FileExt::write_all_at(&self.file, zeros, at) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(error = %e, "zero-filling the write-ahead log buffered: direct I/O refused");
                self.zeros = Vec::new();
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// The frames' own handle of the WAL, opened `O_DIRECT`.
pub(crate) struct DirectFrames {
    file: File,
    /// Grown as needed; the write starts at `start`, the first
    /// page-aligned byte of it.
    buf: Vec<u8>,
    start: usize,
    /// Where `tail` starts in the file.
    tail_at: u64,
    tail: Vec<u8>,
}

impl DirectFrames {
    /// As [`open_direct`].
    pub(crate) fn open(path: &Path, same: &File) -> Option<DirectFrames> {
        let file = open_direct(path, same)?;
        Some(DirectFrames {
            file,
            buf: Vec::new(),
            start: 0,
            tail_at: 0,
            tail: Vec::new(),
        })
    }

    /// The page-aligned write covering `[pos, pos + frame.len())`: where
    /// it starts, and how long it is.
    pub(crate) fn span(pos: u64, len: usize) -> (u64, usize) {
        let at = pos - pos % PAGE as u64;
        let head = (pos - at) as usize;
        (at, (head + len).next_multiple_of(PAGE))
    }

    /// Writes `frame` at `pos` (the end of the frames so far), with the
    /// page's earlier bytes read from `file` (the WAL's buffered handle)
    /// if they are not the last page written. An error of kind
    /// `Unsupported` means the direct write was refused and nothing was
    /// written; any other is the write's own I/O error.
    pub(crate) fn write(&mut self, file: &mut dyn WalIo, pos: u64, frame: &[u8]) -> io::Result<()> {
        let (at, len) = Self::span(pos, frame.len());
        let head = (pos - at) as usize;
        self.reserve(len);
        let start = self.start;
        let out = &mut self.buf[start..start + len];
        if head > 0 {
            if self.tail_at == at && self.tail.len() == head {
                out[..head].copy_from_slice(&self.tail);
            } else if !file.read_at(at, &mut out[..head])? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the write-ahead log is shorter than its frames",
                ));
            }
        }
        out[head..head + frame.len()].copy_from_slice(frame);
        out[head + frame.len()..].fill(0);
        match std::os::unix::fs::FileExt::write_all_at(&self.file, out, at) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(io::Error::new(io::ErrorKind::Unsupported, e));
            }
            Err(e) => return Err(e),
        }
        let end = head + frame.len();
        let last = end - end % PAGE;
        self.tail_at = at + last as u64;
        self.tail.clear();
        self.tail.extend_from_slice(&out[last..end]);
        Ok(())
    }

    /// Makes `buf` hold `len` bytes from a page-aligned `start`.
    fn reserve(&mut self, len: usize) {
        if self.buf.len() >= self.start + len {
            return;
        }
        (self.buf, self.start) = aligned_zeros(len.next_power_of_two().max(64 << 10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zeros it can't write past the page cache (unaligned, or longer than
    /// it was opened for) are left to the caller: nothing written.
    #[test]
    fn direct_zeros_write_whole_pages_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        std::fs::write(&path, vec![0xab; 4 * PAGE]).unwrap();
        let same = File::open(&path).unwrap();
        let Some(mut zeros) = DirectZeros::open(&path, &same, 2 * PAGE) else {
            return; // this file system refuses direct I/O
        };
        assert!(!zeros.write(100, PAGE).unwrap());
        assert!(!zeros.write(PAGE as u64, 100).unwrap());
        assert!(!zeros.write(0, 3 * PAGE).unwrap());
        assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 0xab));
        assert!(zeros.write(PAGE as u64, 2 * PAGE).unwrap());
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[..PAGE].iter().all(|b| *b == 0xab));
        assert!(bytes[PAGE..3 * PAGE].iter().all(|b| *b == 0));
        assert!(bytes[3 * PAGE..].iter().all(|b| *b == 0xab));
    }

    #[test]
    fn a_span_covers_whole_pages_around_the_frame() {
        assert_eq!(DirectFrames::span(4096, 1), (4096, 4096));
        assert_eq!(DirectFrames::span(4096, 4096), (4096, 4096));
        assert_eq!(DirectFrames::span(4096, 4097), (4096, 8192));
        assert_eq!(DirectFrames::span(5000, 3192), (4096, 4096));
        assert_eq!(DirectFrames::span(5000, 3193), (4096, 8192));
        assert_eq!(DirectFrames::span(8191, 1), (4096, 4096));
        assert_eq!(DirectFrames::span(8191, 2), (4096, 8192));
    }
}
