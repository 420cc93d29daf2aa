//! Creating files: every file ctrlbus makes is private to its owner (0600;
//! the log holds webhook secrets), and a new file's directory entry is made
//! durable, so that a power cut right after a create can't lose the file
//! itself while its contents were fsync'd.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// The mode of every file ctrlbus creates.
#[cfg(unix)]
pub(crate) const PRIVATE_MODE: u32 = 0o600;

/// Options that create a missing file as owner-only (0600 on Unix); an
/// existing file keeps its mode.
pub(crate) fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(PRIVATE_MODE);
    }
    o
}

/// Opens `path` for reading and writing, creating it (0600) if missing;
/// when it was created, its directory entry is fsync'd before returning.
///
/// # Errors
/// The I/O error of the open or of the directory's fsync.
pub(crate) fn open_or_create(path: &Path) -> io::Result<File> {
    match private_options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(file) => {
            sync_parent(path)?;
            Ok(file)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            OpenOptions::new().read(true).write(true).open(path)
        }
        Err(e) => Err(e),
    }
}

/// Creates `path` (0600) if it is missing, with its directory entry
/// fsync'd; an existing file is left as it is.
///
/// # Errors
/// As [`open_or_create`].
pub(crate) fn ensure_exists(path: &Path) -> io::Result<()> {
    open_or_create(path).map(drop)
}

/// fsyncs the directory holding `path`, making a create, rename or removal
/// of `path` durable.
///
/// # Errors
/// The I/O error of opening or syncing the directory.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_files_are_private_and_existing_ones_keep_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new");
        ensure_exists(&new).unwrap();
        let mode = std::fs::metadata(&new).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let old = dir.path().join("old");
        std::fs::write(&old, b"x").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o640)).unwrap();
        ensure_exists(&old).unwrap();
        let mode = std::fs::metadata(&old).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(std::fs::read(&old).unwrap(), b"x", "not truncated");
    }
}
