//! What the store is told of the frozen tree's files, as /proc showed them: the records the
//! process layer gathers and the store's captures take (the store itself never walks /proc).

use std::path::PathBuf;

/// One descriptor the tree holds, as /proc shows it.
#[derive(Debug, Clone)]
pub struct TreeFd {
    pub pid: i32,
    pub fd: u32,
    /// What `/proc/PID/fd/N` links to (a path, `socket:[INODE]`, `pipe:[INODE]`, ...).
    pub target: PathBuf,
    /// The open flags from `/proc/PID/fdinfo/N`.
    pub flags: i32,
}

impl TreeFd {
    /// `/proc/PID/fd/N`: the kernel hands over the very object, no path is walked.
    pub fn handle(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", self.pid, self.fd))
    }

    pub fn writes(&self) -> bool {
        self.flags & libc::O_ACCMODE != libc::O_RDONLY || self.flags & libc::O_APPEND != 0
    }
}

/// A file of /dev/shm the tree uses, and where root reaches the very object the process holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmHandle {
    /// The path the process knows it by.
    pub path: std::path::PathBuf,
    /// `/proc/PID/map_files/RANGE` or `/proc/PID/fd/N`.
    pub handle: std::path::PathBuf,
    /// (device, inode) from maps, for a mapping; an fd is the object itself.
    pub expect: Option<(u64, u64)>,
}
