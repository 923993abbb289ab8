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

/// Atomically replaces `path` with `bytes` (mode 0600).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| StoreError::Write { path: tmp.clone(), source })?;
        f.write_all(bytes).map_err(|source| StoreError::Write { path: tmp.clone(), source })?;
        f.sync_all().map_err(|source| StoreError::Sync { path: tmp.clone(), source })?;
        fs::rename(&tmp, path).map_err(|source| StoreError::Rename {
            from: tmp.clone(),
            to: path.to_path_buf(),
            source,
        })?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsyncs every regular file and directory under `dir` and returns the total size of the files.
pub fn fsync_tree(dir: &Path) -> Result<u64, StoreError> {
    let mut total = 0;
    let entries = fs::read_dir(dir).map_err(|source| StoreError::Read { path: dir.to_path_buf(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| StoreError::Read { path: dir.to_path_buf(), source })?;
        let path = entry.path();
        let ft = entry.file_type().map_err(|source| StoreError::Read { path: path.clone(), source })?;
        if ft.is_dir() {
            total += fsync_tree(&path)?;
        } else if ft.is_file() {
            let f = File::open(&path).map_err(|source| StoreError::Read { path: path.clone(), source })?;
            f.sync_all().map_err(|source| StoreError::Sync { path: path.clone(), source })?;
            total += f.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    fsync_dir(dir)?;
    Ok(total)
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

    #[test]
    fn fsync_tree_sums_file_sizes() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("images")).unwrap();
        fs::write(d.path().join("images/a.img"), [0u8; 100]).unwrap();
        fs::write(d.path().join("b"), [0u8; 23]).unwrap();
        assert_eq!(fsync_tree(d.path()).unwrap(), 123);
    }
}
