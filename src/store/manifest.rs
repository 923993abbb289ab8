//! `manifest.json`: what a checkpoint is and what restoring it needs. Written last, inside the
//! not-yet-visible directory, so a checkpoint with a manifest is a complete one.
//!
//! Format 2 adds the generation, the versions and config digest the checkpoint was taken with, a
//! checksum of every image file and the identity of every executable the tree mapped. Format 1
//! manifests still load (their new fields are absent); fields written by a newer stasis are kept
//! in `unknown` and ignored.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: u32 = 2;
pub const HASH_ALGORITHM: &str = "blake3";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DumpKind {
    /// Taken through the kill port or `stop`: the service was stopped by the dump.
    Stop,
    /// Taken by `checkpoint`: the service kept running.
    KeepRunning,
    /// Taken by the supervisor every `checkpoint_every`: the service kept running.
    Periodic,
}

impl DumpKind {
    /// The service runs on after the dump (`--leave-running`).
    pub fn leaves_running(self) -> bool {
        self != DumpKind::Stop
    }
}

/// One file of the checkpoint, as it was when the checkpoint became durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    /// Relative to the checkpoint directory, e.g. `images/pages-1.img`.
    pub path: String,
    pub size: u64,
    /// BLAKE3, hex.
    pub hash: String,
}

/// A file the checkpointed tree executed or mapped executable, as it was at the dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i128,
    pub dev: u64,
    pub inode: u64,
    /// BLAKE3 of the content, hex.
    pub hash: String,
}

/// How a checkpoint's pages are compressed at rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compression {
    /// Only `zstd`.
    pub algorithm: String,
    pub level: i32,
}

/// How a checkpoint's images are encrypted at rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// Only `xchacha20poly1305`.
    pub algorithm: String,
    /// Which key (see `store::seal::Key::id`); a key with another id is the wrong one.
    pub key_id: String,
}

/// How long the checkpoint took and how big it is. Added after the images are durable (the
/// dump's figures once CRIU has returned, `restore_ms` at each restore).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// How long the service was frozen (CRIU's own measure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_ms: Option<u64>,
    /// The whole `criu dump`, as stasis saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump_ms: Option<u64>,
    /// Making the images durable (and checksumming them in the same pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsync_ms: Option<u64>,
    /// The last `criu restore` of this checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<u64>,
    /// Memory pages CRIU wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<u64>,
    /// Bytes of image files written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    /// The service's generation counter when the checkpoint was begun (absent in format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    pub service: String,
    pub kind: DumpKind,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub stasis_version: String,
    pub criu_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    /// Digest of the service settings that shape the process (command, user, directory, environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// The namespace init binary the images map; it must exist, unchanged, to restore.
    pub init_binary: PathBuf,
    /// Inode of the pipe that was the service's stdout/stderr; restore re-attaches a new pipe in its place.
    pub stdout_pipe_inode: Option<u64>,
    /// Total size of the files in the checkpoint directory.
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_algorithm: Option<String>,
    /// Every file under `images/`; None in format 1 (nothing to verify against).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<Vec<ImageFile>>,
    /// The executable and every file-backed executable mapping of the tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executables: Option<Vec<FileIdentity>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// Set when the memory pages are stored compressed (`images/pages-N.img.zst`); a restore
    /// gives CRIU the plain files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// Set when every image is stored sealed (`images/NAME.enc`); the key is not here, only its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Files of /dev/shm the tree mapped or held open (POSIX shared memory), copied into
    /// `images/` while it was frozen: a reboot empties /dev/shm, and CRIU reopens them by path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_files: Option<Vec<ShmFile>>,
    /// Fields this version does not know (from a newer stasis): kept when rewritten, never fatal.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// One file of /dev/shm kept with a checkpoint (its copy is `images/` + [`ShmFile::image_name`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmFile {
    /// The file's name in /dev/shm (no slash).
    pub name: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
}

impl ShmFile {
    pub fn image_name(&self) -> String {
        format!("{}{}", super::shm::IMAGE_PREFIX, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_1_manifests_still_load() {
        let v1 = r#"{"format":1,"id":"20261125T015053.123Z","service":"notes","kind":"stop",
            "created_at":"2026-11-25T01:50:53Z","stasis_version":"0.1.0","criu_version":"4.2.1",
            "init_binary":"/var/lib/stasis/bin/stasis-init-ab","stdout_pipe_inode":12,"size_bytes":5}"#;
        let m: Manifest = serde_json::from_str(v1).unwrap();
        assert_eq!(m.generation, None);
        assert!(m.images.is_none());
    }

    #[test]
    fn unknown_fields_from_a_newer_stasis_are_kept() {
        let v3 = r#"{"format":3,"id":"00000009-x","generation":9,"service":"s","kind":"keep-running",
            "created_at":"t","stasis_version":"9","criu_version":"5","init_binary":"/i",
            "stdout_pipe_inode":null,"size_bytes":1,"sealing":{"algo":"x9"}}"#;
        let m: Manifest = serde_json::from_str(v3).unwrap();
        assert_eq!(m.unknown["sealing"]["algo"], "x9");
        let again = serde_json::to_value(&m).unwrap();
        assert_eq!(again["sealing"]["algo"], "x9");
    }
}
