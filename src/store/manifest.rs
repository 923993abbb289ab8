//! `manifest.json`: what a checkpoint is and what restoring it needs. Written last, inside the
//! not-yet-visible directory, so a checkpoint with a manifest is a complete one.
//!
//! Format 2 adds the generation, the versions and config digest the checkpoint was taken with, a
//! checksum of every image file and the identity of every executable the tree mapped. Format 3
//! adds the manifest's own checksum (`manifest_checksum`: BLAKE3 of the manifest without that
//! key, its object keys sorted), checked before anything in it is used, so that one flipped bit
//! can neither change a recorded hash nor rename a key and turn verification off. A manifest
//! that lacks what its format requires is damaged, exactly like one whose checksum is wrong.
//! Format 1 manifests still load (they cannot be verified: a restore refuses them); fields written by a newer stasis are kept in `unknown` and ignored.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: u32 = 3;
/// The key that holds the manifest's own checksum.
pub const CHECKSUM_KEY: &str = "manifest_checksum";
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
/// Images live here, in a checkpoint's directory; an [`ImageFile`]'s path starts with it.
pub const IMAGES_DIR: &str = "images";

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
    /// A pre-copy stop: how long its pre-dump took (the service ran meanwhile) and how many
    /// pages it copied; `pages` is then what the freeze added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_copy_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_copy_pages: Option<u64>,
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
    /// Directories a reboot empties (under /run, or on a tmpfs) that hold the unix sockets the
    /// tree bound or the small files it held open, parents first: recreated before a restore
    /// when missing, since CRIU binds and opens by path (see store::tmpfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs_dirs: Option<Vec<TmpfsDir>>,
    /// Small regular files there the tree held open, copied into `images/` while it was frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs_files: Option<Vec<TmpfsFile>>,
    /// Regular files the tree held open for writing, as they were at the freeze: a restore
    /// tells an append from a rewrite with them (see store::written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_files: Option<Vec<WrittenFile>>,
    /// An incremental checkpoint: the checkpoint of this store whose memory pages this one's
    /// pagemaps point into for every page that did not change (CRIU's `PE_PARENT` runs). A
    /// restore needs the whole chain (store::chain); retention keeps it (pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// A pre-copy stop: the pre-dump taken while the service ran, kept inside this checkpoint
    /// (`images/pre-dump/`, its files listed and hashed with the rest), holds every page the
    /// final dump's pagemaps mark as in the parent. The checkpoint is complete by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_copy: Option<String>,
    /// Fields this version does not know (from a newer stasis): kept when rewritten, never fatal.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// The parent of an incremental checkpoint, as it was when the child was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub id: String,
    /// [`Manifest::content_hash`] of the parent: a parent replaced by another checkpoint of the
    /// same id (an import, a restore from backup) is caught, not used.
    pub content_hash: String,
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

/// A directory of /run (or of a tmpfs) the tree's sockets or files live in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TmpfsDir {
    pub path: PathBuf,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A small file of /run (or of a tmpfs) the tree held open; its copy is `images/IMAGE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TmpfsFile {
    pub path: PathBuf,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub image: String,
}

/// A regular file the tree held open for writing, at the freeze.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenFile {
    pub path: PathBuf,
    pub size: u64,
    /// BLAKE3 of its `size` bytes, hex; absent when the file was over the hashing cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// The name of its copy in `images/`, for a small file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<String>,
}

/// Why a manifest's bytes cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestDamage {
    /// Not JSON, or not the shape of a manifest.
    Unreadable(String),
    /// Its own checksum does not match its content.
    Checksum { recorded: String, actual: String },
    /// A key its format requires is missing or of the wrong kind.
    Missing { format: u64, key: &'static str },
}

impl std::fmt::Display for ManifestDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestDamage::Unreadable(e) => write!(f, "it is not a readable manifest ({e})"),
            ManifestDamage::Checksum { recorded, actual } => {
                write!(f, "its own checksum does not match its content (recorded {recorded}, computed {actual})")
            }
            ManifestDamage::Missing { format, key } => {
                write!(f, "format {format} requires the key \"{key}\", which is missing or of the wrong kind")
            }
        }
    }
}

/// What format 2 and later require beyond the fields every manifest has (serde checks those),
/// and of what kind: a key renamed by damage must not read as "not recorded".
const REQUIRED_SINCE_2: &[(&str, fn(&serde_json::Value) -> bool)] = &[
    ("generation", serde_json::Value::is_u64),
    ("hash_algorithm", |v| v.as_str() == Some(HASH_ALGORITHM)),
    ("images", |v| v.as_array().is_some_and(|a| !a.is_empty())),
    ("executables", serde_json::Value::is_array),
    ("config_digest", serde_json::Value::is_string),
    ("kernel_version", serde_json::Value::is_string),
];

/// The keys `format` requires, with the test each value must pass.
fn required(format: u64) -> impl Iterator<Item = (&'static str, fn(&serde_json::Value) -> bool)> {
    let since_2: &[(&str, fn(&serde_json::Value) -> bool)] = if format >= 2 { REQUIRED_SINCE_2 } else { &[] };
    let since_3: &[(&str, fn(&serde_json::Value) -> bool)] =
        if format >= 3 { &[(CHECKSUM_KEY, serde_json::Value::is_string)] } else { &[] };
    since_2.iter().chain(since_3).copied()
}

/// The JSON text of `v` with every object's keys sorted: the same value always gives the same
/// bytes, whatever order a writer used.
fn canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(k).expect("a string serializes"));
                out.push(b':');
                canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend(serde_json::to_vec(scalar).expect("a scalar serializes")),
    }
}

fn checksum_of(v: &serde_json::Value) -> String {
    let mut bytes = Vec::new();
    canonical(v, &mut bytes);
    blake3::hash(&bytes).to_hex().to_string()
}

impl Manifest {
    /// What a child's [`ParentRef`] pins: BLAKE3 of the id, the pre-copy layer, the parent it
    /// names in turn and every image's path, size and hash. The figures (`timings`, rewritten at
    /// each restore) are left out: they change nothing a restore reads.
    pub fn content_hash(&self) -> String {
        let v = serde_json::json!({
            "id": self.id,
            "images": self.images,
            "parent": self.parent,
            "pre_copy": self.pre_copy,
        });
        checksum_of(&v)
    }

    /// The manifest as written to disk, carrying its own checksum.
    pub fn to_sealed_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_value(self).expect("manifest serializes");
        let obj = v.as_object_mut().expect("a manifest is an object");
        obj.remove(CHECKSUM_KEY);
        let sum = checksum_of(&v);
        v.as_object_mut().expect("still an object").insert(CHECKSUM_KEY.into(), sum.into());
        serde_json::to_vec_pretty(&v).expect("manifest serializes")
    }

    /// Reads a manifest from disk, trusting nothing in it until its checksum (whenever one is
    /// present, whatever the format says) and the keys its format requires check out.
    pub fn from_sealed_bytes(bytes: &[u8]) -> Result<Manifest, ManifestDamage> {
        let mut v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ManifestDamage::Unreadable(e.to_string()))?;
        let obj = v.as_object_mut().ok_or_else(|| ManifestDamage::Unreadable("not a JSON object".into()))?;
        let format = obj.get("format").and_then(serde_json::Value::as_u64).unwrap_or(0);
        for (key, fits) in required(format) {
            if !obj.get(key).is_some_and(fits) {
                return Err(ManifestDamage::Missing { format, key });
            }
        }
        if let Some(recorded) = obj.remove(CHECKSUM_KEY) {
            let recorded = recorded.as_str().unwrap_or_default().to_string();
            let actual = checksum_of(&v);
            if recorded != actual {
                return Err(ManifestDamage::Checksum { recorded, actual });
            }
        }
        serde_json::from_value(v).map_err(|e| ManifestDamage::Unreadable(e.to_string()))
    }
}

/// /dev/shm copies are named `images/stasis-shm.NAME`: flat, and never a name CRIU uses.
pub const SHM_IMAGE_PREFIX: &str = "stasis-shm.";

impl ShmFile {
    pub fn image_name(&self) -> String {
        format!("{SHM_IMAGE_PREFIX}{}", self.name)
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

    fn sealed() -> Manifest {
        let v2 = r#"{"format":3,"id":"00000002-x","generation":2,"service":"s","kind":"stop",
            "created_at":"t","stasis_version":"0","criu_version":"4.2.1","kernel_version":"6.18",
            "config_digest":"c","init_binary":"/i","stdout_pipe_inode":3,"size_bytes":9,
            "hash_algorithm":"blake3","images":[{"path":"images/pages-1.img","size":4096,"hash":"ab"}],
            "executables":[]}"#;
        let mut m: Manifest = serde_json::from_str(v2).unwrap();
        m.format = FORMAT;
        m
    }

    #[test]
    fn a_sealed_manifest_reads_back_and_any_damage_is_caught() {
        let m = sealed();
        let bytes = m.to_sealed_bytes();
        let back = Manifest::from_sealed_bytes(&bytes).unwrap();
        assert_eq!(back.images, m.images);
        assert!(back.unknown.is_empty(), "the checksum is not an unknown field: {:?}", back.unknown);
        // Every single-bit flip of the file is caught or leaves it unreadable: none reads as valid.
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(got) = Manifest::from_sealed_bytes(&b) {
                    // JSON whitespace may change harmlessly (a space becomes another blank? no:
                    // only if the value is the same), so what reads must be exactly the original.
                    assert_eq!(
                        serde_json::to_value(&got).unwrap(),
                        serde_json::to_value(&back).unwrap(),
                        "flip at {i}.{bit}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_renamed_or_missing_required_key_is_damage_not_an_older_format() {
        for key in ["images", "executables", "generation", "hash_algorithm", CHECKSUM_KEY] {
            let mut v: serde_json::Value = serde_json::from_slice(&sealed().to_sealed_bytes()).unwrap();
            let obj = v.as_object_mut().unwrap();
            let value = obj.remove(key).unwrap();
            obj.insert(format!("x{key}"), value);
            let err = Manifest::from_sealed_bytes(&serde_json::to_vec(&v).unwrap()).unwrap_err();
            assert!(matches!(err, ManifestDamage::Missing { key: k, .. } if k == key), "{key}: {err}");
        }
        // Format 2 (before the checksum) still needs its keys.
        let mut v: serde_json::Value = serde_json::to_value(sealed()).unwrap();
        v["format"] = 2.into();
        assert!(Manifest::from_sealed_bytes(&serde_json::to_vec(&v).unwrap()).is_ok());
        v.as_object_mut().unwrap().remove("images");
        assert!(Manifest::from_sealed_bytes(&serde_json::to_vec(&v).unwrap()).is_err());
        // A format number damaged down to 2 or 1 keeps its checksum, which no longer matches.
        let mut v: serde_json::Value = serde_json::from_slice(&sealed().to_sealed_bytes()).unwrap();
        v["format"] = 1.into();
        let err = Manifest::from_sealed_bytes(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(err, ManifestDamage::Checksum { .. }), "{err}");
        // An emptied image hash is caught by the checksum.
        let mut v: serde_json::Value = serde_json::from_slice(&sealed().to_sealed_bytes()).unwrap();
        v["images"][0]["hash"] = "".into();
        assert!(matches!(
            Manifest::from_sealed_bytes(&serde_json::to_vec(&v).unwrap()),
            Err(ManifestDamage::Checksum { .. })
        ));
    }

    #[test]
    fn unknown_fields_from_a_newer_stasis_are_kept() {
        let v3 = r#"{"format":4,"id":"00000009-x","generation":9,"service":"s","kind":"keep-running",
            "created_at":"t","stasis_version":"9","criu_version":"5","init_binary":"/i",
            "stdout_pipe_inode":null,"size_bytes":1,"sealing":{"algo":"x9"}}"#;
        let m: Manifest = serde_json::from_str(v3).unwrap();
        assert_eq!(m.unknown["sealing"]["algo"], "x9");
        let again = serde_json::to_value(&m).unwrap();
        assert_eq!(again["sealing"]["algo"], "x9");
    }
}
