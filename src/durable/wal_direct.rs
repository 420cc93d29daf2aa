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
//! read back from the file when there is none (after a reopen). The
//! bytes after the frame, up to the page's end, are written as zeros:
//! past the last frame there is nothing a recovery keeps (zeros, or
//! frames of older generations, which it refuses).
//!
//! Invariants:
//! - `tail` holds the bytes of the file from `tail_at` (page-aligned) up to
//!   the end of the last frame written, which is less than a page past it.
//! - Only frames go through this handle, and only below the zero-filled
//!   part (`Wal::allocated`), rounded up to a page; the buffered handle
//!   writes the header (page 0) and the zeros past `allocated`, so the two
//!   never write the same page while both may hold it.
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
    /// Opens `path` (the WAL, already open as `same` and locked) for direct
    /// writes; `None` if the file system refuses, or if `path` is no longer
    /// the file `same` is (replaced since).
    pub(crate) fn open(path: &Path, same: &File) -> Option<DirectFrames> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        let (a, b) = (file.metadata().ok()?, same.metadata().ok()?);
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return None;
        }
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
        let mut buf = vec![0u8; len.next_power_of_two().max(64 << 10) + PAGE];
        // The address only picks the offset; nothing is read through it.
        let addr = buf.as_mut_ptr() as usize;
        self.start = (PAGE - addr % PAGE) % PAGE;
        self.buf = buf;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
