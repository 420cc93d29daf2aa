//! A redb storage backend over a file that lets a test act before each
//! operation (fail it, tear it, block it), passing the lock methods through
//! as redb requires of a wrapper.

use std::fs::OpenOptions;
use std::ops::Bound;
use std::path::Path;

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// An operation about to reach the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    SetLen,
    Sync,
}

/// What a test does before each operation: `None` lets it through;
/// `Some(result)` replaces it (`inner` is there to do part of it, e.g. a
/// torn write).
pub trait Hook: Send + Sync + std::fmt::Debug + 'static {
    fn before(
        &self,
        op: Op,
        inner: &FileBackend,
        offset: u64,
        data: &[u8],
    ) -> Option<std::io::Result<()>>;
}

/// A file backend with a [`Hook`].
#[derive(Debug)]
pub struct Hooked<H> {
    inner: FileBackend,
    pub hook: H,
}

impl<H: Hook> Hooked<H> {
    /// Opens (creating if missing) the file at `path`.
    pub fn open(path: &Path, hook: H) -> Hooked<H> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        Hooked {
            inner: FileBackend::new(file).unwrap(),
            hook,
        }
    }
}

impl<H: Hook> StorageBackend for Hooked<H> {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        if let Some(r) = self.hook.before(Op::Read, &self.inner, offset, &[]) {
            return r;
        }
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        if let Some(r) = self.hook.before(Op::SetLen, &self.inner, len, &[]) {
            return r;
        }
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        if let Some(r) = self.hook.before(Op::Sync, &self.inner, 0, &[]) {
            return r;
        }
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        if let Some(r) = self.hook.before(Op::Write, &self.inner, offset, data) {
            return r;
        }
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), std::io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
