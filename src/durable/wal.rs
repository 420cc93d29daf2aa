//! The write-ahead log: what makes one publish cost one fsync.
//!
//! redb commits durably in two phases when other processes may read the file
//! (`SingleWriter`) or when quick repair is on, which costs about 2.4 fsyncs
//! per commit on these machines against about one for `SQLite`'s WAL (see
//! BENCHMARKS.md). So, when a log is opened from a path, each group commit
//! first appends its new records to `<log>.wal` and `fdatasync`s it (one
//! fsync, the acknowledgement point of G2); the writer applies the
//! accumulated groups to redb in one durable commit every `apply_interval`
//! (20 ms), amortizing redb's commit over many groups. After a crash, the
//! frames past the file's last `seq` are replayed. Once the WAL holds 16 MiB
//! it starts over: a new generation from the file's start. If frames at its
//! end are not applied yet (a busy log always has some), the new
//! generation *carries* them: its header says where they start, recovery
//! reads them first, and new frames stay below them until they are applied
//! (`Carry`). So the WAL stays near 16 MiB under any load, where it used to
//! grow to 64 MiB and then stall publishers on the applier.
//!
//! File layout: a 4096-byte header (`MAGIC`, version, generation, the log's
//! id, [version 2: where the carried frames start,] CRC), then
//! frames `[FRAME_MAGIC u32][generation u64][len u32][crc32 u32][payload]`.
//! A payload is `[first_seq u64][count u32]` then per record `[len u32][bytes]`
//! (records are `codec` records; each carries its append time). All integers
//! little-endian. The file is preallocated with zeros so that appends
//! overwrite allocated blocks and `fdatasync` flushes data only; a thread
//! of its own fills the zeros ahead of the frames (`wal_ahead`). On Linux
//! with sync on, frames go past the page cache (`wal_direct`).
//!
//! Invariants:
//! - Frames of the current generation hold consecutive `seq`s, starting
//!   right after the `seq` that was durable in redb when the generation began.
//! - The WAL belongs to the log whose id (`meta["log_id"]`) is in its header;
//!   a WAL with another id (left beside a file that was deleted and
//!   recreated) is discarded, never replayed into the wrong log.
//! - A frame is valid only if its magic, generation and CRC match; recovery
//!   stops at the first invalid frame (a torn write of an unacknowledged
//!   group).
//! - The generation changes only after a durable redb commit holds every
//!   record of the old generation, or with a carry: a header naming where
//!   the old generation's first unapplied frame starts, written and synced
//!   before any frame of the new generation. Frames of the new generation
//!   end below that offset (page-rounded writes included) until a durable
//!   redb commit holds every carried record and a header without the carry
//!   is synced. Frames of a generation may repeat `seq`s already in the
//!   file; recovery skips those.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::wal_ahead::Ahead;
#[cfg(target_os = "linux")]
use super::wal_direct::DirectFrames;

const MAGIC: &[u8; 8] = b"CBUSWAL1";
/// The header's version without a carry (and the only one before carries).
const VERSION: u32 = 1;
/// The header's version with a carry: 8 more bytes before the CRC.
const VERSION_CARRY: u32 = 2;
const HEADER_LEN: u64 = 4096;
/// Bytes of the header that hold data (the rest is zero): 40 in version 1.
const HEADER_USED: usize = 48;
/// Where the header's CRC sits (it covers the bytes before it), by version.
const CRC_AT: usize = 36;
const CRC_AT_CARRY: usize = 44;
const FRAME_MAGIC: u32 = 0xC7B0_5E01;
const FRAME_HEAD: usize = 4 + 8 + 4 + 4;
/// Bytes preallocated at a time.
const GROW: u64 = 8 << 20;
/// Bytes preallocated first (a one-shot `ctrlbus publish` should not
/// write megabytes of zeros).
const FIRST_GROWTH: u64 = 1 << 20;
/// Preallocated bytes a clean close keeps (beyond the header).
const KEEP_ON_CLOSE: u64 = 8 << 20;

/// The WAL path of a log file.
pub(crate) fn path_for(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".wal");
    PathBuf::from(p)
}

/// The WAL's file layer: what the WAL does to its file, and nothing else.
/// `std::fs::File` in production; the power-loss tests put a file here that
/// keeps unsynced writes apart, to drop them (whole or torn) at a "power
/// cut".
pub(crate) trait WalIo: Send {
    /// The file's length.
    fn len(&mut self) -> io::Result<u64>;
    /// Reads exactly `buf.len()` bytes at `pos`; false at end of file.
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> io::Result<bool>;
    /// Writes all of `data` at `pos`.
    fn write_at(&mut self, pos: u64, data: &[u8]) -> io::Result<()>;
    /// Truncates or extends the file.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// `fdatasync`.
    fn sync_data(&mut self) -> io::Result<()>;
    /// `fsync`.
    fn sync_all(&mut self) -> io::Result<()>;
}

impl WalIo for File {
    fn len(&mut self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> io::Result<bool> {
        read_full(self, pos, buf)
    }
    #[cfg(unix)]
    fn write_at(&mut self, pos: u64, data: &[u8]) -> io::Result<()> {
        // One `pwrite` (no `lseek` per frame), leaving the file position
        // alone: the zero-filling thread's handle shares it (`wal_ahead`).
        std::os::unix::fs::FileExt::write_all_at(self, data, pos)
    }
    #[cfg(not(unix))]
    fn write_at(&mut self, pos: u64, data: &[u8]) -> io::Result<()> {
        use std::io::Write;
        self.seek(SeekFrom::Start(pos))?;
        self.write_all(data)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn sync_all(&mut self) -> io::Result<()> {
        File::sync_all(self)
    }
}

/// Wraps the WAL's file once it is open and locked (tests: power loss).
#[derive(Clone)]
pub(crate) struct WalIoWrap(pub(crate) Arc<dyn Fn(File) -> Box<dyn WalIo> + Send + Sync>);

impl std::fmt::Debug for WalIoWrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WalIoWrap")
    }
}

/// The previous generation's frames a generation carries: they start at
/// `from` and end with `last_seq`, and are not all in redb yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Carry {
    from: u64,
    last_seq: u64,
}

/// A valid header.
struct Header {
    generation: u64,
    log_id: [u8; 16],
    /// Where the carried frames (of `generation - 1`) start.
    carry_from: Option<u64>,
}

/// One recovered frame.
pub(crate) struct Frame {
    pub(crate) first_seq: u64,
    pub(crate) records: Vec<Vec<u8>>,
}

pub(crate) struct Wal {
    file: Box<dyn WalIo>,
    generation: u64,
    log_id: [u8; 16],
    /// Where the next frame goes.
    pos: u64,
    /// Bytes of the file known to be allocated (zero-filled or written).
    allocated: u64,
    sync: bool,
    buf: Vec<u8>,
    /// Fault injection for tests: I/O steps left before one fails.
    faults: Option<Arc<AtomicU64>>,
    /// The thread that zero-fills ahead of the frames; `None` when the
    /// file layer is wrapped or faults are injected (tests: every write
    /// goes through that layer), or no thread could start. The committer
    /// then grows the file itself.
    ahead: Option<Ahead>,
    /// The frames' direct-I/O handle (`wal_direct`): Linux with sync on,
    /// unless the file layer is wrapped or faults are injected, or the file
    /// system refuses direct I/O.
    #[cfg(target_os = "linux")]
    direct: Option<DirectFrames>,
    /// The previous generation's frames this one carries, until applied.
    carry: Option<Carry>,
    /// Each frame of this generation appended since it began and not known
    /// to be applied: the `seq` after its last record, and where it
    /// starts. What a restart carries. (Frames recovered at an open are
    /// not here: the open replays them and starts a new generation before
    /// any append.)
    frames: VecDeque<(u64, u64)>,
    /// The fill thread is not asked for zeros past here (`limit_fill`).
    fill_limit: u64,
    /// How far past the frames the fill thread is asked to keep zeros:
    /// `FILL_LEAD` at first, doubled (up to `GROW`) each time the
    /// committer has to write zeros for a frame itself.
    fill_lead: u64,
}

/// The first lead of zeros past the frames. Zeros written while frames
/// are being synced share the disk with them: with an 8 MiB lead a fresh
/// log's first 20,000 events (8 MiB of frames) wrote 15 MiB of zeros, and
/// 1 MiB made `bench publish` 1.04-1.11x as fast at 64 publishers and
/// 1.03-1.06x at 16 (BENCHMARKS.md, "Fourteenth session"). The thread first
/// fell behind at a 256 KiB lead, with 4 KiB events at 64 publishers.
const FILL_LEAD: u64 = 1 << 20;

/// Zeros the fill thread keeps past a restarting WAL's restart size: the
/// last frame before a restart ends past it (by one group).
const FILL_PAST_RESTART: u64 = 1 << 20;

impl Wal {
    /// Opens (or creates) the WAL and returns the frames of its current
    /// generation, oldest first.
    pub(crate) fn open(
        path: &Path,
        log_id: [u8; 16],
        sync: bool,
        faults: Option<Arc<AtomicU64>>,
        wrap: Option<&WalIoWrap>,
    ) -> io::Result<(Wal, Vec<Frame>)> {
        let file = crate::files::open_or_create(path)?;
        // Held while this process owns the log: a reader (`check`, `stats`)
        // in another process tells a live owner from a crashed one by it.
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("{} is in use by another process", path.display()),
            ),
            std::fs::TryLockError::Error(e) => e,
        })?;
        // The zero-filling thread and direct I/O only for a file written as
        // it is: a wrapped file layer or injected faults (tests) see every
        // write go through them.
        let plain = wrap.is_none() && faults.is_none();
        // A handle of its own for the zero-filling thread; it writes with
        // `pwrite` (`WalIo::write_at`), so the two never share a position.
        // Elsewhere a write is a seek and a write on a position the two
        // handles would share: no thread there.
        let fill = (plain && cfg!(unix))
            .then(|| file.try_clone().ok())
            .flatten();
        // Direct writes wait for the disk: only worth it where every frame
        // is waited for anyway (sync on).
        let direct_io = plain && sync;
        #[cfg(target_os = "linux")]
        let (direct, fill_direct) = if direct_io {
            let zeros = super::wal_ahead::CHUNK as usize;
            (
                DirectFrames::open(path, &file),
                super::wal_ahead::DirectZeros::open(path, &file, zeros),
            )
        } else {
            (None, None)
        };
        #[cfg(not(target_os = "linux"))]
        let fill_direct = {
            let _ = direct_io;
            None
        };
        let mut file: Box<dyn WalIo> = match wrap {
            Some(w) => (w.0)(file),
            None => Box::new(file),
        };
        let len = file.len()?;
        let mut header = [0u8; HEADER_USED];
        let mut foreign = false;
        let parsed = if len >= HEADER_LEN && file.read_at(0, &mut header)? {
            let h = parse_header(&header).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a ctrlbus WAL", path.display()),
                )
            })?;
            if h.log_id != log_id {
                tracing::warn!(wal = %path.display(), "discarding a write-ahead log of another log file");
                foreign = true;
            }
            h
        } else if len == 0 {
            Header {
                generation: 0,
                log_id,
                carry_from: None,
            }
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a ctrlbus WAL", path.display()),
            ));
        };
        let mut wal = Wal {
            file,
            generation: parsed.generation,
            log_id,
            pos: HEADER_LEN,
            allocated: len,
            sync,
            buf: Vec::new(),
            faults,
            ahead: None,
            #[cfg(target_os = "linux")]
            direct,
            carry: None,
            frames: VecDeque::new(),
            fill_limit: u64::MAX,
            fill_lead: FILL_LEAD,
        };
        if foreign {
            // A new generation under our id: the old frames no longer count.
            wal.reset()?;
            wal.start_fill(fill, fill_direct);
            return Ok((wal, Vec::new()));
        }
        if len == 0 {
            wal.write_header(None)?;
        }
        let frames = wal.recover(&parsed, len)?;
        wal.start_fill(fill, fill_direct);
        Ok((wal, frames))
    }

    /// Starts the zero-filling thread on `fill`, and asks it at once for
    /// the first growth's zeros: a fresh log's first publish then finds
    /// them written (or waits for one chunk), instead of writing a
    /// megabyte of zeros and syncing it itself.
    fn start_fill(&mut self, fill: Option<File>, direct: Option<super::wal_ahead::DirectZeros>) {
        self.ahead = fill.and_then(|f| Ahead::start(f, direct, self.allocated, self.sync));
        if let Some(ahead) = &mut self.ahead {
            ahead.ask(HEADER_LEN + FIRST_GROWTH);
        }
    }

    fn recover(&mut self, header: &Header, len: u64) -> io::Result<Vec<Frame>> {
        let (frames, pos, carry) = read_all_frames(self.file.as_mut(), header, len)?;
        self.pos = pos;
        self.carry = carry;
        Ok(frames)
    }

    /// Appends one frame and makes it durable (unless sync is off).
    pub(crate) fn append<'a>(
        &mut self,
        first_seq: u64,
        records: impl ExactSizeIterator<Item = &'a [u8]>,
    ) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.resize(FRAME_HEAD, 0);
        buf.extend_from_slice(&first_seq.to_le_bytes());
        let count = u32::try_from(records.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many records"))?;
        buf.extend_from_slice(&count.to_le_bytes());
        for r in records {
            buf.extend_from_slice(&(r.len() as u32).to_le_bytes());
            buf.extend_from_slice(r);
        }
        // Groups and batches are capped well below this (`MAX_BATCH_BYTES`):
        // a length that does not fit is refused, never wrapped.
        let plen = u32::try_from(buf.len() - FRAME_HEAD).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a write-ahead-log frame over 4 GiB",
            )
        })?;
        let crc = frame_crc(self.generation, &buf[FRAME_HEAD..]);
        buf[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        buf[4..12].copy_from_slice(&self.generation.to_le_bytes());
        buf[12..16].copy_from_slice(&plen.to_le_bytes());
        buf[16..20].copy_from_slice(&crc.to_le_bytes());
        let at = self.pos;
        let result = self.write_at_end(&buf);
        self.buf = buf;
        if result.is_ok() {
            self.frames.push_back((first_seq + u64::from(count), at));
        }
        result
    }

    /// Bytes of the frame `append` would write for records of these lengths.
    pub(crate) fn frame_len(records: impl Iterator<Item = usize>) -> usize {
        FRAME_HEAD + 12 + records.map(|n| 4 + n).sum::<usize>()
    }

    /// True when a frame of `len` bytes can't be written until the carried
    /// frames are applied ([`Wal::release_carry`]): it would reach them.
    pub(crate) fn carry_blocks(&self, len: usize) -> bool {
        self.carry.is_some_and(|c| self.written_up_to(len) > c.from)
    }

    /// Whether this generation still carries frames of the previous one.
    pub(crate) fn carrying(&self) -> bool {
        self.carry.is_some()
    }

    /// Forgets the frames whose records are all at or below `applied`
    /// (durable in redb), and ends the carry once it is all applied: a
    /// header without it, synced, so new frames may overwrite it.
    pub(crate) fn release_carry(&mut self, applied: u64) -> io::Result<()> {
        while self.frames.front().is_some_and(|f| f.0 <= applied + 1) {
            self.frames.pop_front();
        }
        if self.carry.is_some_and(|c| c.last_seq <= applied) {
            self.write_header(None)?;
            self.carry = None;
        }
        Ok(())
    }

    /// Starts a new generation although records above `applied` may not
    /// be in redb yet: it carries their frames (see the module docs), and
    /// says whether there were any (without, the same as [`Wal::reset`]).
    /// Refused while carrying.
    pub(crate) fn restart_carrying(&mut self, applied: u64) -> io::Result<bool> {
        if self.carry.is_some() {
            return Err(io::Error::other(
                "the write-ahead log restarts while it still carries frames",
            ));
        }
        self.release_carry(applied)?;
        let carry = match (self.frames.front(), self.frames.back()) {
            (Some(&(_, from)), Some(&(end, _))) => Some(Carry {
                from,
                last_seq: end - 1,
            }),
            _ => None,
        };
        self.start_generation(carry)?;
        Ok(carry.is_some())
    }

    fn write_at_end(&mut self, frame: &[u8]) -> io::Result<()> {
        let end = self.pos + frame.len() as u64;
        // What must be zero-filled before the write: a direct write covers
        // the frame's last page whole (else it would grow the file).
        let room = self.written_up_to(frame.len());
        if self.carry_blocks(frame.len()) {
            // The committer waits for the applier first (`carry_blocks`);
            // this only happens if that apply failed.
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "the write-ahead log is full: the frames it carries are not applied",
            ));
        }
        if room > self.allocated
            && let Some(ahead) = &self.ahead
        {
            self.allocated = self.allocated.max(ahead.allocated());
        }
        if room > self.allocated {
            // Preallocate with real zeros (not a sparse hole) so that later
            // appends do not change the file's block map. With the thread,
            // only the chunks this frame needs (the thread fills on);
            // without it, FIRST_GROWTH first, doubling, then GROW at a time.
            let target = if self.ahead.is_some() {
                room.next_multiple_of(super::wal_ahead::CHUNK)
            } else if room <= GROW {
                room.next_power_of_two().max(FIRST_GROWTH)
            } else {
                room.div_ceil(GROW) * GROW
            };
            let (file, sync) = (&mut self.file, self.sync);
            self.allocated = if let Some(ahead) = &self.ahead {
                // The thread has fallen behind: fill the rest here (it
                // waits meanwhile, so the two never write the same bytes).
                let (allocated, behind) =
                    ahead.fill_now(target, |from, to| zero_fill(file.as_mut(), from, to, sync))?;
                if behind {
                    // It had not got there even after its chunk in hand:
                    // keep more zeros ahead from now on.
                    self.fill_lead = (self.fill_lead * 2).min(GROW);
                }
                allocated
            } else {
                zero_fill(file.as_mut(), self.allocated, target, sync)?;
                target
            };
        }
        if self.inject_fault() {
            // A torn write: half the frame reaches the file.
            self.file.write_at(self.pos, &frame[..frame.len() / 2])?;
            return Err(io::Error::other("injected write failure"));
        }
        self.write_frame(frame)?;
        if self.inject_fault() {
            return Err(io::Error::other("injected fsync failure"));
        }
        if self.sync {
            let started = std::time::Instant::now();
            self.file.sync_data()?;
            crate::telemetry::fsync(started.elapsed());
        }
        self.pos = end;
        if let Some(ahead) = &mut self.ahead {
            // Keep as many zeros ahead as the frames use, up to the lead: a
            // one-shot publish writes no more zeros than the first growth.
            // Not past the fill limit: frames restart before it.
            let upto = (end + end.min(self.fill_lead)).min(self.fill_limit);
            if upto > self.allocated {
                ahead.ask(upto.next_multiple_of(super::wal_ahead::CHUNK));
            }
        }
        Ok(())
    }

    /// Tells the WAL it restarts once it holds `restart_bytes` of frames
    /// (`maybe_restart_wal`): the fill thread then stops asking for zeros
    /// one restart size plus `FILL_PAST_RESTART` into the file. Before, it
    /// kept up to 8 MiB of zeros past frames that never reached them, so a
    /// busy log's WAL peaked at 24 MiB for a 16 MiB restart size. A frame
    /// past the limit (a group larger than the margin) is still written:
    /// the committer fills for it.
    pub(crate) fn limit_fill(&mut self, restart_bytes: u64) {
        self.fill_limit = HEADER_LEN
            .saturating_add(restart_bytes)
            .saturating_add(FILL_PAST_RESTART)
            .checked_next_multiple_of(super::wal_ahead::CHUNK)
            .unwrap_or(u64::MAX);
    }

    /// Where the write of a `len`-byte frame at `pos` ends in the file.
    fn written_up_to(&self, len: usize) -> u64 {
        #[cfg(target_os = "linux")]
        if self.direct.is_some() {
            let (at, span) = DirectFrames::span(self.pos, len);
            return at + span as u64;
        }
        self.pos + len as u64
    }

    /// Writes `frame` at `pos`: past the page cache when it can
    /// (`wal_direct`), else buffered.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(direct) = &mut self.direct {
            match direct.write(self.file.as_mut(), self.pos, frame) {
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    tracing::debug!(error = %e, "writing the write-ahead log's frames buffered: direct I/O refused");
                    self.direct = None;
                }
                done => return done,
            }
        }
        self.file.write_at(self.pos, frame)
    }

    /// True when the fault countdown (tests only) says this step fails.
    fn inject_fault(&self) -> bool {
        self.faults.as_ref().is_some_and(|c| {
            c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
                .is_err()
        })
    }

    /// The current generation.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes of frames in the current generation.
    pub(crate) fn used(&self) -> u64 {
        self.pos - HEADER_LEN
    }

    /// Starts a new generation and gives back the file's space beyond
    /// `KEEP_ON_CLOSE` (the preallocated space is real blocks, up to tens of
    /// MiB): for a clean close, once every frame is durable in redb. What is
    /// kept spares the next run the first growths (writing zeros and an
    /// fsync each, ~8 ms for the first 8 MiB here).
    pub(crate) fn trim(&mut self) -> io::Result<()> {
        // Stop the zero-filling first: nothing may grow the file after.
        if let Some(ahead) = self.ahead.take() {
            self.allocated = self.allocated.max(ahead.allocated());
        }
        self.reset()?;
        let keep = HEADER_LEN + KEEP_ON_CLOSE;
        if self.allocated > keep {
            self.file.set_len(keep)?;
            if self.sync {
                self.file.sync_all()?;
            }
            self.allocated = keep;
        }
        Ok(())
    }

    /// Starts a new generation: every frame so far is durable in redb.
    pub(crate) fn reset(&mut self) -> io::Result<()> {
        self.start_generation(None)
    }

    /// A new generation from the file's start, carrying `carry`: its
    /// header first (synced, with sync on), then no frame of its own yet.
    fn start_generation(&mut self, carry: Option<Carry>) -> io::Result<()> {
        self.generation += 1;
        self.write_header(carry.map(|c| c.from))?;
        self.carry = carry;
        self.frames.clear();
        self.pos = HEADER_LEN;
        Ok(())
    }

    /// Writes (and with sync, syncs) the header of the current generation:
    /// version 1 without a carry, version 2 with where it starts.
    fn write_header(&mut self, carry_from: Option<u64>) -> io::Result<()> {
        let mut h = vec![0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[12..20].copy_from_slice(&self.generation.to_le_bytes());
        h[20..36].copy_from_slice(&self.log_id);
        let used = match carry_from {
            None => {
                h[8..12].copy_from_slice(&VERSION.to_le_bytes());
                CRC_AT
            }
            Some(from) => {
                h[8..12].copy_from_slice(&VERSION_CARRY.to_le_bytes());
                h[CRC_AT..CRC_AT_CARRY].copy_from_slice(&from.to_le_bytes());
                CRC_AT_CARRY
            }
        };
        let crc = crc32fast::hash(&h[0..used]);
        h[used..used + 4].copy_from_slice(&crc.to_le_bytes());
        self.file.write_at(0, &h)?;
        if self.sync {
            self.file.sync_data()?;
        }
        self.allocated = self.allocated.max(HEADER_LEN);
        Ok(())
    }
}

/// Reads the valid frames of `generation` from a WAL of `len` bytes, and
/// where the next frame would go. Recovery stops at the first frame that
/// is torn (magic, generation, length or CRC wrong) or out of sequence: a
/// frame whose CRC holds but whose first `seq` does not follow the frame
/// before it can only be damage, and what follows it can't be placed in
/// `seq` order, so it is the end of the log (with a warning).
fn read_frames(
    file: &mut dyn WalIo,
    generation: u64,
    from: u64,
    len: u64,
    frames: &mut Vec<Frame>,
) -> io::Result<u64> {
    let mut pos = from;
    let mut head = [0u8; FRAME_HEAD];
    while pos + FRAME_HEAD as u64 <= len {
        if !file.read_at(pos, &mut head)? {
            break;
        }
        let magic = u32::from_le_bytes(head[0..4].try_into().unwrap_or_default());
        let frame_generation = u64::from_le_bytes(head[4..12].try_into().unwrap_or_default());
        let plen = u64::from(u32::from_le_bytes(
            head[12..16].try_into().unwrap_or_default(),
        ));
        let crc = u32::from_le_bytes(head[16..20].try_into().unwrap_or_default());
        if magic != FRAME_MAGIC
            || frame_generation != generation
            || pos + FRAME_HEAD as u64 + plen > len
        {
            break;
        }
        let mut payload = vec![0u8; usize::try_from(plen).unwrap_or(usize::MAX)];
        if !file.read_at(pos + FRAME_HEAD as u64, &mut payload)? {
            break;
        }
        if frame_crc(generation, &payload) != crc {
            break;
        }
        let Some(frame) = parse_payload(&payload) else {
            break;
        };
        if let Some(prev) = frames.last() {
            let expected = prev.first_seq + prev.records.len() as u64;
            if frame.first_seq != expected {
                tracing::warn!(
                    expected,
                    found = frame.first_seq,
                    "a write-ahead-log frame is out of sequence; the log ends before it"
                );
                break;
            }
        }
        frames.push(frame);
        pos += FRAME_HEAD as u64 + plen;
    }
    Ok(pos)
}

/// Reads the frames a WAL with `header` holds, oldest first: those it
/// carries (of the generation before, from where the header says), then
/// its own from the start, below the carried ones; a frame of its own
/// that does not follow the carried ones in `seq` ends the log, as
/// `read_frames` says. Returns them, where the next frame goes, and the
/// carry.
fn read_all_frames(
    file: &mut dyn WalIo,
    header: &Header,
    len: u64,
) -> io::Result<(Vec<Frame>, u64, Option<Carry>)> {
    let mut frames = Vec::new();
    let mut carry = None;
    let mut own_end = len;
    if let Some(from) = header.carry_from {
        read_frames(file, header.generation - 1, from, len, &mut frames)?;
        let last_seq = frames
            .last()
            .map_or(0, |f| f.first_seq + f.records.len() as u64 - 1);
        carry = Some(Carry { from, last_seq });
        own_end = from.min(len);
    }
    let pos = read_frames(file, header.generation, HEADER_LEN, own_end, &mut frames)?;
    Ok((frames, pos, carry))
}

/// What a WAL file holds, read without changing or locking it (for
/// `check` and read-only opens).
pub(crate) struct WalInfo {
    pub(crate) generation: u64,
    pub(crate) log_id: [u8; 16],
    pub(crate) frames: Vec<Frame>,
    /// Whether a process holds the WAL (the log's owner is running).
    pub(crate) owned: bool,
}

/// How much of a WAL [`inspect`] reads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inspect {
    /// The header only (`frames` empty): an open, which reads the frames
    /// itself next.
    Header,
    /// The frames too, unless an owner holds the WAL (it applies them).
    FramesUnlessOwned,
    /// The frames too (`check`).
    Frames,
}

/// Reads the WAL at `path` read-only, as much as `what` says. `Ok(None)`
/// when there is no WAL file, or it is empty (never written).
///
/// # Errors
/// The I/O error, or `InvalidData` for a file that is not a ctrlbus WAL.
pub(crate) fn inspect(path: &Path, what: Inspect) -> io::Result<Option<WalInfo>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut header = [0u8; HEADER_USED];
    let parsed = if len >= HEADER_LEN && read_full(&mut file, 0, &mut header)? {
        parse_header(&header)
    } else {
        None
    };
    let Some(header) = parsed else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a ctrlbus WAL", path.display()),
        ));
    };
    let owned = match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    };
    let frames = match what {
        Inspect::Header => Vec::new(),
        Inspect::FramesUnlessOwned if owned => Vec::new(),
        _ => read_all_frames(&mut file, &header, len)?.0,
    };
    Ok(Some(WalInfo {
        generation: header.generation,
        log_id: header.log_id,
        frames,
        owned,
    }))
}

fn frame_crc(generation: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// A valid header (version 1, or 2 with a carry), or `None`.
fn parse_header(h: &[u8; HEADER_USED]) -> Option<Header> {
    if &h[0..8] != MAGIC {
        return None;
    }
    let used = match u32::from_le_bytes(h[8..12].try_into().ok()?) {
        VERSION => CRC_AT,
        VERSION_CARRY => CRC_AT_CARRY,
        _ => return None,
    };
    let crc = u32::from_le_bytes(h[used..used + 4].try_into().ok()?);
    if crc32fast::hash(&h[0..used]) != crc {
        return None;
    }
    let generation = u64::from_le_bytes(h[12..20].try_into().ok()?);
    let carry_from = if used == CRC_AT_CARRY {
        let from = u64::from_le_bytes(h[CRC_AT..CRC_AT_CARRY].try_into().ok()?);
        // A carry is of the generation before, from past the header.
        if generation == 0 || from < HEADER_LEN {
            return None;
        }
        Some(from)
    } else {
        None
    };
    Some(Header {
        generation,
        log_id: h[20..36].try_into().ok()?,
        carry_from,
    })
}

fn parse_payload(p: &[u8]) -> Option<Frame> {
    let first_seq = u64::from_le_bytes(p.get(0..8)?.try_into().ok()?);
    let count = u32::from_le_bytes(p.get(8..12)?.try_into().ok()?) as usize;
    let mut at = 12;
    let mut records = Vec::with_capacity(count.min(p.len() / 4));
    for _ in 0..count {
        let len = u32::from_le_bytes(p.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        records.push(p.get(at..at.checked_add(len)?)?.to_vec());
        at += len;
    }
    (at == p.len()).then_some(Frame { first_seq, records })
}

/// Writes zeros over `[from, to)` and (with `sync`) syncs them with the
/// file's block map.
fn zero_fill(file: &mut dyn WalIo, from: u64, to: u64, sync: bool) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(zeros.len());
        file.write_at(at, &zeros[..n])?;
        at += n as u64;
    }
    if sync {
        file.sync_all()?;
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes at `pos`; false at end of file.
fn read_full(file: &mut File, pos: u64, buf: &mut [u8]) -> io::Result<bool> {
    file.seek(SeekFrom::Start(pos))?;
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => return Ok(false),
            n => got += n,
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: [u8; 16] = [7; 16];

    #[test]
    fn a_wal_of_another_log_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        {
            let (mut wal, _) = Wal::open(&path, ID, true, None, None).unwrap();
            wal.append(1, [b"a".as_slice()].into_iter()).unwrap();
        }
        let (mut wal, frames) = Wal::open(&path, [8; 16], true, None, None).unwrap();
        assert!(
            frames.is_empty(),
            "frames of another log must not be replayed"
        );
        wal.append(1, [b"b".as_slice()].into_iter()).unwrap();
        drop(wal);
        let (_, frames) = Wal::open(&path, [8; 16], true, None, None).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].records, vec![b"b".to_vec()]);
        // And the first log no longer claims it.
        let (_, frames) = Wal::open(&path, ID, true, None, None).unwrap();
        assert!(frames.is_empty());
    }

    #[test]
    fn frames_round_trip_and_reset_discards() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        {
            let (mut wal, frames) = Wal::open(&path, ID, true, None, None).unwrap();
            assert!(frames.is_empty());
            wal.append(1, [b"a".as_slice(), b"bc".as_slice()].into_iter())
                .unwrap();
            wal.append(3, [b"".as_slice()].into_iter()).unwrap();
        }
        {
            let (mut wal, frames) = Wal::open(&path, ID, true, None, None).unwrap();
            assert_eq!(frames.len(), 2);
            assert_eq!(frames[0].first_seq, 1);
            assert_eq!(frames[0].records, vec![b"a".to_vec(), b"bc".to_vec()]);
            assert_eq!(frames[1].first_seq, 3);
            wal.reset().unwrap();
            wal.append(4, [b"d".as_slice()].into_iter()).unwrap();
        }
        let (_, frames) = Wal::open(&path, ID, true, None, None).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].first_seq, 4);
    }

    #[test]
    fn torn_frame_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        {
            let (mut wal, _) = Wal::open(&path, ID, true, None, None).unwrap();
            wal.append(1, [b"first".as_slice()].into_iter()).unwrap();
            wal.append(2, [b"second".as_slice()].into_iter()).unwrap();
        }
        // Corrupt one byte of the second frame's payload.
        let mut bytes = std::fs::read(&path).unwrap();
        let second = HEADER_LEN as usize + FRAME_HEAD + 12 + 4 + 5 + FRAME_HEAD + 14;
        bytes[second] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, frames) = Wal::open(&path, ID, true, None, None).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].records, vec![b"first".to_vec()]);
    }

    #[test]
    fn the_first_megabyte_of_zeros_is_written_in_the_background_from_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        let (wal, _) = Wal::open(&path, ID, true, None, None).unwrap();
        let ahead = wal.ahead.as_ref().expect("a fill thread on a plain file");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while ahead.allocated() < HEADER_LEN + FIRST_GROWTH {
            assert!(
                std::time::Instant::now() < deadline,
                "no zeros before the first publish: {} bytes",
                ahead.allocated()
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // No publish yet, and no more than the first growth.
        assert_eq!(wal.used(), 0);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            HEADER_LEN + FIRST_GROWTH
        );
    }

    /// One frame per record: seq `first..` with a record of `len` bytes.
    fn append_each(wal: &mut Wal, first: u64, lens: &[usize]) {
        for (seq, &len) in (first..).zip(lens) {
            let record = vec![seq as u8; len];
            wal.append(seq, [record.as_slice()].into_iter()).unwrap();
        }
    }

    /// The seqs of `frames`' records, in order.
    fn seqs_of(frames: &[Frame]) -> Vec<u64> {
        frames
            .iter()
            .flat_map(|f| f.first_seq..f.first_seq + f.records.len() as u64)
            .collect()
    }

    fn header_version(path: &Path) -> u32 {
        let bytes = std::fs::read(path).unwrap();
        u32::from_le_bytes(bytes[8..12].try_into().unwrap())
    }

    #[test]
    fn a_restart_carries_the_unapplied_frames_until_they_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        let lens = [10, 5000, 300, 4096, 1, 7000, 20, 20, 9000, 3];
        {
            let (mut wal, _) = Wal::open(&path, ID, true, None, None).unwrap();
            append_each(&mut wal, 1, &lens);
            let generation = wal.generation();
            // Seqs 1-4 are in redb: 5-10 are carried.
            wal.restart_carrying(4).unwrap();
            assert!(wal.carrying());
            assert_eq!(wal.generation(), generation + 1);
            assert_eq!(wal.used(), 0);
            assert_eq!(header_version(&path), VERSION_CARRY);
            append_each(&mut wal, 11, &[100, 200]);
            // A crash here: the carried frames, then the new ones.
        }
        let info = inspect(&path, Inspect::Frames).unwrap().unwrap();
        assert_eq!(seqs_of(&info.frames), (5..=12).collect::<Vec<_>>());
        let (mut wal, frames) = Wal::open(&path, ID, true, None, None).unwrap();
        assert_eq!(seqs_of(&frames), (5..=12).collect::<Vec<_>>());
        for f in &frames {
            let len = lens.get(f.first_seq as usize - 1).copied();
            let len = len.unwrap_or(if f.first_seq == 11 { 100 } else { 200 });
            assert_eq!(f.records, vec![vec![f.first_seq as u8; len]]);
        }
        assert!(wal.carrying(), "the reopened WAL still carries seqs 5-10");
        // Applied up to 9: still carried; up to 10: a header without it.
        wal.release_carry(9).unwrap();
        assert!(wal.carrying());
        wal.release_carry(10).unwrap();
        assert!(!wal.carrying());
        assert_eq!(header_version(&path), VERSION);
        append_each(&mut wal, 13, &[50]);
        drop(wal);
        let (_, frames) = Wal::open(&path, ID, true, None, None).unwrap();
        assert_eq!(seqs_of(&frames), vec![11, 12, 13]);
    }

    #[test]
    fn a_frame_that_would_reach_the_carried_frames_waits_for_their_apply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        let (mut wal, _) = Wal::open(&path, ID, true, None, None).unwrap();
        // Seq 1 is small and applied; seq 2 is carried, from just past it.
        append_each(&mut wal, 1, &[10, 6000]);
        wal.restart_carrying(1).unwrap();
        let len = Wal::frame_len([100].into_iter());
        assert!(wal.carry_blocks(len));
        let refused = wal.append(3, [[3u8; 100].as_slice()].into_iter());
        assert_eq!(
            refused.unwrap_err().kind(),
            io::ErrorKind::StorageFull,
            "a frame over the carried ones must be refused"
        );
        // Nothing was written: the carried frame is whole.
        let info = inspect(&path, Inspect::Frames).unwrap().unwrap();
        assert_eq!(seqs_of(&info.frames), vec![2]);
        assert_eq!(info.frames[0].records, vec![vec![2u8; 6000]]);
        // Once seq 2 is applied, the same frame goes in.
        wal.release_carry(2).unwrap();
        assert!(!wal.carry_blocks(len));
        wal.append(3, [[3u8; 100].as_slice()].into_iter()).unwrap();
        drop(wal);
        let (_, frames) = Wal::open(&path, ID, true, None, None).unwrap();
        assert_eq!(seqs_of(&frames), vec![3]);
    }

    #[test]
    fn a_restart_with_everything_applied_carries_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        let (mut wal, _) = Wal::open(&path, ID, true, None, None).unwrap();
        append_each(&mut wal, 1, &[10, 20, 30]);
        wal.restart_carrying(3).unwrap();
        assert!(!wal.carrying());
        assert_eq!(header_version(&path), VERSION);
        // Restarting again while carrying is refused.
        append_each(&mut wal, 4, &[10, 20]);
        wal.restart_carrying(4).unwrap();
        assert!(wal.carrying());
        assert!(wal.restart_carrying(5).is_err());
        drop(wal);
        let (_, frames) = Wal::open(&path, ID, true, None, None).unwrap();
        assert_eq!(seqs_of(&frames), vec![5]);
    }

    #[test]
    fn a_carry_header_that_makes_no_sense_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        {
            let (mut wal, _) = Wal::open(&path, ID, true, None, None).unwrap();
            append_each(&mut wal, 1, &[10, 20]);
            wal.restart_carrying(1).unwrap();
        }
        let good = std::fs::read(&path).unwrap();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            f(&mut bytes);
            let crc = crc32fast::hash(&bytes[0..44]);
            bytes[44..48].copy_from_slice(&crc.to_le_bytes());
            std::fs::write(&path, &bytes).unwrap();
            Wal::open(&path, ID, true, None, None).map(|(_, f)| seqs_of(&f))
        };
        assert_eq!(with(&|_| {}).unwrap(), vec![2]);
        // A carry from inside the header, or of a generation before 0.
        let inside = with(&|b| b[36..44].copy_from_slice(&100u64.to_le_bytes()));
        assert_eq!(inside.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let before_zero = with(&|b| b[12..20].copy_from_slice(&0u64.to_le_bytes()));
        assert_eq!(before_zero.unwrap_err().kind(), io::ErrorKind::InvalidData);
        // An unknown version.
        let version = with(&|b| b[8..12].copy_from_slice(&3u32.to_le_bytes()));
        assert_eq!(version.unwrap_err().kind(), io::ErrorKind::InvalidData);
        // A carry past the end of the file: nothing carried, nothing lost.
        let past = with(&|b| b[36..44].copy_from_slice(&(1u64 << 40).to_le_bytes()));
        assert_eq!(past.unwrap(), Vec::<u64>::new());
    }

    /// Whether the file system under `dir` takes `O_DIRECT` at all.
    #[cfg(target_os = "linux")]
    fn direct_io_works(dir: &Path) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        let probe = dir.join("probe");
        std::fs::write(&probe, [0u8; 4096]).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
            .is_ok()
    }

    /// A WAL whose frames are written buffered, with sync on (a fault
    /// countdown that never runs out turns the direct handle off).
    #[cfg(target_os = "linux")]
    fn buffered(path: &Path) -> (Wal, Vec<Frame>) {
        let never = Some(Arc::new(AtomicU64::new(u64::MAX)));
        Wal::open(path, ID, true, never, None).unwrap()
    }

    fn records_of(frames: &[Frame]) -> Vec<(u64, Vec<Vec<u8>>)> {
        frames
            .iter()
            .map(|f| (f.first_seq, f.records.clone()))
            .collect()
    }

    /// Frames of sizes around page bounds, across reopens (the tail page
    /// then comes from the file) and a reset, written past the page cache:
    /// the file holds byte for byte what buffered writes give, up to the
    /// last frame, and every frame comes back.
    #[cfg(target_os = "linux")]
    #[test]
    fn direct_frames_are_the_bytes_of_buffered_frames_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let (direct, plain) = (dir.path().join("d.wal"), dir.path().join("b.wal"));
        let mut next = crate::test_rng::xorshift(0x5eed_0fd1);
        let mut seq = 1;
        let mut kept: Vec<(u64, Vec<Vec<u8>>)> = Vec::new();
        for round in 0..5 {
            let (mut d, got) = Wal::open(&direct, ID, true, None, None).unwrap();
            let (mut b, got_plain) = buffered(&plain);
            assert_eq!(d.direct.is_some(), direct_io_works(dir.path()));
            assert!(b.direct.is_none());
            assert_eq!(records_of(&got), kept, "round {round}");
            assert_eq!(records_of(&got_plain), kept, "round {round}");
            if round == 3 {
                d.reset().unwrap();
                b.reset().unwrap();
                kept.clear();
            }
            for i in 0..40 {
                // One frame's payload is 12 bytes plus 4 per record: these
                // land frames' ends on, just before and just after a page
                // bound, and sizes up to 5 pages.
                let len = match i % 4 {
                    0 => 4096 - FRAME_HEAD - 16,
                    1 => (next() % 64) as usize,
                    2 => 4097 + (next() % 16_000) as usize,
                    _ => (next() % 4096) as usize,
                };
                let record: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                d.append(seq, [record.as_slice()].into_iter()).unwrap();
                b.append(seq, [record.as_slice()].into_iter()).unwrap();
                kept.push((seq, vec![record]));
                seq += 1;
            }
            assert_eq!(d.pos, b.pos);
            let (dbytes, bbytes) = (
                std::fs::read(&direct).unwrap(),
                std::fs::read(&plain).unwrap(),
            );
            let end = d.pos as usize;
            assert!(
                dbytes[..end] == bbytes[..end],
                "round {round}: the files differ before the last frame's end"
            );
        }
    }

    /// Without fsyncs the frames are written buffered: a direct write waits
    /// for the disk, and with `sync(false)` nothing else does.
    #[cfg(target_os = "linux")]
    #[test]
    fn without_sync_frames_are_written_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(&dir.path().join("x.wal"), ID, false, None, None).unwrap();
        assert!(wal.direct.is_none());
        wal.append(1, [b"a".as_slice()].into_iter()).unwrap();
        drop(wal);
        let (_, frames) = Wal::open(&dir.path().join("x.wal"), ID, true, None, None).unwrap();
        assert_eq!(records_of(&frames), vec![(1, vec![b"a".to_vec()])]);
    }

    /// A WAL cut inside its last frame (an odd length): the frames before
    /// come back, and frames appended after the cut (from inside a page,
    /// into a file no longer a whole number of pages) come back too.
    #[test]
    fn frames_appended_after_a_cut_inside_a_frame_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        let (a, b, c) = (vec![1u8; 3000], vec![2u8; 3000], vec![3u8; 5000]);
        {
            let (mut wal, _) = Wal::open(&path, ID, true, None, None).unwrap();
            wal.append(1, [a.as_slice()].into_iter()).unwrap();
            wal.append(2, [b.as_slice()].into_iter()).unwrap();
        }
        let cut = HEADER_LEN + (FRAME_HEAD + 16 + 3000) as u64 + 100;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        {
            let (mut wal, frames) = Wal::open(&path, ID, true, None, None).unwrap();
            assert_eq!(records_of(&frames), vec![(1, vec![a.clone()])]);
            wal.append(2, [c.as_slice()].into_iter()).unwrap();
        }
        let (_, frames) = Wal::open(&path, ID, true, None, None).unwrap();
        assert_eq!(records_of(&frames), vec![(1, vec![a]), (2, vec![c])]);
    }

    /// The fill thread is asked for zeros `FILL_LEAD` past the frames, not
    /// as far again as they reach; a frame the committer has to fill for
    /// doubles the lead, up to `GROW`.
    #[test]
    fn zeros_lead_the_frames_by_one_megabyte_until_a_frame_finds_them_behind() {
        use super::super::wal_ahead::CHUNK;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        let (mut wal, _) = Wal::open(&path, ID, true, None, None).unwrap();
        let asked = |wal: &Wal| wal.ahead.as_ref().unwrap().asked();
        let end = |wal: &Wal| HEADER_LEN + wal.used();
        // The first growth's zeros, asked for at the open.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while wal.ahead.as_ref().unwrap().allocated() < HEADER_LEN + FIRST_GROWTH {
            assert!(std::time::Instant::now() < deadline, "no zeros");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // 768 KiB of frames, inside those zeros: as many zeros asked for
        // past them as they use (under one lead).
        append_each(&mut wal, 1, &[64 << 10; 12]);
        assert_eq!(wal.fill_lead, FILL_LEAD);
        assert_eq!(asked(&wal), (2 * end(&wal)).next_multiple_of(CHUNK));
        // A frame longer than the lead: the committer fills for it, and the
        // lead doubles, each time, up to GROW.
        for (seq, len, lead) in [
            (13, 4 << 20, 2 * FILL_LEAD),
            (14, 5 << 20, 4 * FILL_LEAD),
            (15, 9 << 20, GROW),
            (16, 9 << 20, GROW),
        ] {
            append_each(&mut wal, seq, &[len]);
            assert_eq!(wal.fill_lead, lead, "after frame {seq}");
            assert_eq!(asked(&wal), (end(&wal) + lead).next_multiple_of(CHUNK));
        }
        drop(wal);
        let (_, frames) = Wal::open(&path, ID, true, None, None).unwrap();
        assert_eq!(seqs_of(&frames), (1..=16).collect::<Vec<_>>());
    }

    /// With a restart size, the fill thread is asked for zeros up to one
    /// restart size and `FILL_PAST_RESTART` in, never further (without it,
    /// as far again as the frames reach); a frame past that is still
    /// written, the committer filling for it, and comes back.
    #[test]
    fn the_fill_stops_one_margin_past_the_restart_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        let restart = 1 << 20;
        let limit = (HEADER_LEN + restart + FILL_PAST_RESTART)
            .next_multiple_of(super::super::wal_ahead::CHUNK);
        let (mut wal, _) = Wal::open(&path, ID, true, None, None).unwrap();
        wal.limit_fill(restart);
        // 1.5 MiB of frames: unlimited, the thread would be asked for
        // 2.5 MiB (a lead of `FILL_LEAD`).
        append_each(&mut wal, 1, &[50_000; 32]);
        let asked = wal.ahead.as_ref().unwrap().asked();
        assert_eq!(asked, limit, "asked for {asked} bytes");
        // Past the limit: written all the same.
        append_each(&mut wal, 33, &[400_000; 2]);
        assert!(wal.used() + HEADER_LEN > limit);
        assert_eq!(wal.ahead.as_ref().unwrap().asked(), limit);
        drop(wal);
        let (_, frames) = Wal::open(&path, ID, true, None, None).unwrap();
        assert_eq!(seqs_of(&frames), (1..=34).collect::<Vec<_>>());
        // A restart size near u64::MAX sets no limit, and no overflow.
        let (mut wal, _) = Wal::open(&path, ID, true, None, None).unwrap();
        wal.limit_fill(u64::MAX - 1);
        assert_eq!(wal.fill_limit, u64::MAX);
    }

    #[test]
    fn not_a_wal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        std::fs::write(&path, vec![1u8; 5000]).unwrap();
        assert!(Wal::open(&path, ID, true, None, None).is_err());
    }
}
