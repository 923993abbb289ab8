//! `manifest.json`: what a checkpoint is and what restoring it needs. Written last, inside the
//! not-yet-visible directory, so a checkpoint with a manifest is a complete one.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DumpKind {
    /// Taken through the kill port or `stop`: the service was stopped by the dump.
    Stop,
    /// Taken by `checkpoint`: the service kept running.
    KeepRunning,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub service: String,
    pub kind: DumpKind,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub stasis_version: String,
    pub criu_version: String,
    /// The namespace init binary the images map; it must exist, unchanged, to restore.
    pub init_binary: PathBuf,
    /// Inode of the pipe that was the service's stdout/stderr; restore re-attaches a new pipe in its place.
    pub stdout_pipe_inode: Option<u64>,
    /// Total size of the files in the checkpoint directory.
    pub size_bytes: u64,
}
