use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to create {path}: {source}{}", space_hint(source))]
    Create { path: PathBuf, source: std::io::Error },
    #[error("failed to write {path}: {source}{}", space_hint(source))]
    Write { path: PathBuf, source: std::io::Error },
    #[error("failed to make {path} durable (fsync): {source}{}", space_hint(source))]
    Sync { path: PathBuf, source: std::io::Error },
    #[error("failed to read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("failed to parse manifest {path}: {reason}; the checkpoint is damaged (move it aside, or delete it)")]
    BadManifest { path: PathBuf, reason: String },
    #[error("failed to trust {path}: {found}; checkpoints someone else could write cannot be restored safely; if it is yours: `chown root:root {path} && chmod 700 {path}`")]
    NotPrivate { path: PathBuf, found: String },
    #[error("failed to finalize the checkpoint in {dir}: CRIU left no images in it")]
    NoImages { dir: PathBuf },
    #[error("failed to move {from} to {to}: {source}")]
    Rename { from: PathBuf, to: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Unsafe(#[from] super::safe_open::UnsafeFile),
    #[error("failed to copy {path} into {dir}: it holds {needed} bytes of data, {dir} has {free} free and min_free_bytes is {min_free}; free space, lower min_free_bytes, or move --state-dir")]
    NoRoom { path: PathBuf, dir: PathBuf, needed: u64, free: u64, min_free: u64 },
    #[error("failed to read the free space of {path}: {source}")]
    FreeSpace { path: PathBuf, source: std::io::Error },
}

fn space_hint(e: &std::io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        " (the disk is full: free space, or point --state-dir at a larger filesystem)"
    } else {
        ""
    }
}
