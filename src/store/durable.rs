//! Durable writes: write a temporary file, fsync it, rename it over the target, fsync the
//! directory. A reader sees the old file or the new one, never a torn one, even after a crash.

use super::StoreError;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|source| StoreError::Sync { path: dir.to_path_buf(), source })
}

/// How much of [`write_atomic_with`]'s work reaches the disk before it returns. Every kind is
/// atomic (a reader sees the old file or the new one); they differ in what a power cut keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// File and directory fsynced: the new content survives a power cut. For what a restore's
    /// correctness rests on (generations, manifests, quarantine reasons).
    Full,
    /// The file fsynced, not its directory: after a power cut the old or the new file, whole.
    /// For figures added to a file that must stay readable (a manifest's timings).
    File,
    /// Neither: after a power cut the old, the new, or (rarely) an empty file, which readers
    /// treat as absent. For state that is rebuilt or only informs (status, counters, caches):
    /// an fsync costs about a millisecond on the path someone waits on.
    None,
}

/// Atomically replaces `path` with `bytes` (mode 0600), durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_atomic_with(path, bytes, Durability::Full)
}

/// Atomically replaces `path` with `bytes` (mode 0600), as durably as asked.
pub fn write_atomic_with(path: &Path, bytes: &[u8], durability: Durability) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Unique per writer: two processes replacing the same file must not share a temporary.
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.{seq}.tmp", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| StoreError::Write { path: tmp.clone(), source })?;
        f.write_all(bytes).map_err(|source| StoreError::Write { path: tmp.clone(), source })?;
        if durability != Durability::None {
            f.sync_all().map_err(|source| StoreError::Sync { path: tmp.clone(), source })?;
        }
        fs::rename(&tmp, path).map_err(|source| StoreError::Rename {
            from: tmp.clone(),
            to: path.to_path_buf(),
            source,
        })?;
        if durability == Durability::Full {
            fsync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` with the given mode (an existing one gets the mode too). Missing parents are
/// created with the usual 0755, so that only the leaf is restricted.
pub fn create_dir_with_mode(dir: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    parent
        .map_or(Ok(()), |p| fs::DirBuilder::new().recursive(true).mode(0o755).create(p))
        .and_then(|_| match fs::DirBuilder::new().mode(mode).create(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
            other => other,
        })
        .and_then(|_| fs::set_permissions(dir, fs::Permissions::from_mode(mode)))
        .map_err(|source| StoreError::Create { path: dir.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("status.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
