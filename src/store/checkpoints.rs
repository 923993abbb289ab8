//! Checkpoint directories. A dump goes into `checkpoints/.incomplete-ID/`; finalizing fsyncs
//! every file, writes the manifest and renames the directory to `checkpoints/ID/`. Only then is
//! it a checkpoint, and nothing ever deletes or rewrites the previous one before that.

use super::durable::{create_dir_with_mode, fsync_dir, fsync_tree, write_atomic};
use super::manifest::{Manifest, MANIFEST_FILE};
use super::StoreError;
use crate::paths::ServicePaths;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

const INCOMPLETE_PREFIX: &str = ".incomplete-";
const DRAFT_FILE: &str = "manifest.draft.json";
const IMAGES_DIR: &str = "images";
pub const QUARANTINE_REASON_FILE: &str = "quarantine-reason.txt";

#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    quarantine_dir: PathBuf,
}

/// A complete checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub id: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Checkpoint {
    pub fn images_dir(&self) -> PathBuf {
        self.dir.join(IMAGES_DIR)
    }
}

/// A checkpoint being written; invisible to `latest()` until finalized.
#[derive(Debug, Clone)]
pub struct PendingCheckpoint {
    pub id: String,
    pub dir: PathBuf,
}

impl PendingCheckpoint {
    /// Recovers the pending checkpoint from its directory (CRIU's action hook only has the path).
    pub fn from_dir(dir: &Path) -> Option<Self> {
        let name = dir.file_name()?.to_str()?;
        let id = name.strip_prefix(INCOMPLETE_PREFIX)?.to_string();
        Some(PendingCheckpoint { id, dir: dir.to_path_buf() })
    }

    pub fn images_dir(&self) -> PathBuf {
        self.dir.join(IMAGES_DIR)
    }

    fn final_dir(&self) -> PathBuf {
        self.dir.with_file_name(&self.id)
    }

    pub fn write_draft(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let path = self.dir.join(DRAFT_FILE);
        let bytes = serde_json::to_vec_pretty(manifest).expect("manifest serializes");
        fs::write(&path, bytes).map_err(|source| StoreError::Write { path, source })
    }

    /// fsyncs everything, writes the manifest (from the draft) and makes the checkpoint visible.
    pub fn finalize(&self) -> Result<Checkpoint, StoreError> {
        let draft_path = self.dir.join(DRAFT_FILE);
        let mut manifest = read_manifest(&draft_path)?;
        fs::remove_file(&draft_path).map_err(|source| StoreError::Write { path: draft_path.clone(), source })?;
        let files = fsync_tree(&self.dir)?;
        let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        manifest.size_bytes = files + bytes.len() as u64;
        let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        write_atomic(&self.dir.join(MANIFEST_FILE), &bytes)?;
        let final_dir = self.final_dir();
        fs::rename(&self.dir, &final_dir).map_err(|source| StoreError::Rename {
            from: self.dir.clone(),
            to: final_dir.clone(),
            source,
        })?;
        fsync_dir(final_dir.parent().expect("checkpoint dir has a parent"))?;
        Ok(Checkpoint { id: self.id.clone(), dir: final_dir, manifest })
    }

    /// Whether a finalize already happened (in CRIU's action hook) for this pending checkpoint.
    pub fn finalized(&self) -> Option<Checkpoint> {
        let dir = self.final_dir();
        let manifest = read_manifest(&dir.join(MANIFEST_FILE)).ok()?;
        Some(Checkpoint { id: self.id.clone(), dir, manifest })
    }

    /// Removes a dump that failed. Never touches complete checkpoints.
    pub fn discard(&self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One directory under `checkpoints/`, valid or not.
#[derive(Debug, Clone)]
pub struct ListedCheckpoint {
    pub id: String,
    pub dir: PathBuf,
    pub manifest: Result<Manifest, String>,
}

impl CheckpointStore {
    pub fn new(paths: &ServicePaths) -> Self {
        CheckpointStore { dir: paths.checkpoints(), quarantine_dir: paths.quarantine() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn quarantine_dir(&self) -> &Path {
        &self.quarantine_dir
    }

    /// Starts a new checkpoint directory (root-only) with a fresh, time-ordered id.
    pub fn begin(&self) -> Result<PendingCheckpoint, StoreError> {
        create_dir_with_mode(&self.dir, 0o700)?;
        let base = crate::time_fmt::compact_utc(SystemTime::now());
        for n in 0..100 {
            let id = if n == 0 { base.clone() } else { format!("{base}-{n}") };
            if self.dir.join(&id).exists() {
                continue;
            }
            let dir = self.dir.join(format!("{INCOMPLETE_PREFIX}{id}"));
            match fs::create_dir(&dir) {
                Ok(()) => {
                    let pending = PendingCheckpoint { id, dir };
                    create_dir_with_mode(&pending.images_dir(), 0o700)?;
                    return Ok(pending);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(StoreError::Create { path: dir, source }),
            }
        }
        Err(StoreError::Create {
            path: self.dir.join(base),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "too many checkpoints in one millisecond"),
        })
    }

    /// All checkpoint directories, oldest first; damaged ones carry the reason.
    pub fn list(&self) -> Result<Vec<ListedCheckpoint>, StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Read { path: self.dir.clone(), source }),
        };
        let mut out: Vec<ListedCheckpoint> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let id = e.file_name().to_str()?.to_string();
                if id.starts_with('.') {
                    return None;
                }
                let dir = e.path();
                let manifest = read_manifest(&dir.join(MANIFEST_FILE)).map_err(|e| e.to_string());
                Some(ListedCheckpoint { id, dir, manifest })
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The newest complete checkpoint with a readable manifest.
    pub fn latest(&self) -> Result<Option<Checkpoint>, StoreError> {
        Ok(self
            .list()?
            .into_iter()
            .rev()
            .find_map(|c| c.manifest.ok().map(|manifest| Checkpoint { id: c.id, dir: c.dir, manifest })))
    }

    /// Moves a checkpoint that failed to restore out of the way, keeping it (and CRIU's log) for
    /// inspection. Returns where it went.
    pub fn quarantine(&self, id: &str, reason: &str) -> Result<PathBuf, StoreError> {
        create_dir_with_mode(&self.quarantine_dir, 0o700)?;
        let from = self.dir.join(id);
        let mut to = self.quarantine_dir.join(id);
        let mut n = 1;
        while to.exists() {
            to = self.quarantine_dir.join(format!("{id}-{n}"));
            n += 1;
        }
        fs::rename(&from, &to).map_err(|source| StoreError::Rename { from: from.clone(), to: to.clone(), source })?;
        fsync_dir(&self.dir)?;
        write_atomic(&to.join(QUARANTINE_REASON_FILE), format!("{reason}\n").as_bytes())?;
        Ok(to)
    }

    /// Removes leftovers of dumps that never completed (a crash mid-dump). They were never
    /// checkpoints, so nothing restorable is lost.
    pub fn remove_incomplete(&self) {
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.filter_map(Result::ok) {
                if e.file_name().to_str().is_some_and(|n| n.starts_with(INCOMPLETE_PREFIX)) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

fn read_manifest(path: &Path) -> Result<Manifest, StoreError> {
    let bytes = fs::read(path).map_err(|source| StoreError::Read { path: path.to_path_buf(), source })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::BadManifest { path: path.to_path_buf(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DumpKind;

    fn store(root: &Path) -> CheckpointStore {
        let paths = ServicePaths { root: root.to_path_buf(), lock: root.join("l"), control_socket: root.join("s") };
        CheckpointStore::new(&paths)
    }

    fn draft(id: &str) -> Manifest {
        Manifest {
            format: 1,
            id: id.into(),
            service: "svc".into(),
            kind: DumpKind::Stop,
            created_at: "2026-11-25T00:00:00Z".into(),
            stasis_version: "0".into(),
            criu_version: "4.2.1".into(),
            init_binary: "/x".into(),
            stdout_pipe_inode: Some(7),
            size_bytes: 0,
        }
    }

    #[test]
    fn pending_checkpoints_are_invisible_until_finalized() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let p = s.begin().unwrap();
        fs::write(p.images_dir().join("core.img"), b"abc").unwrap();
        p.write_draft(&draft(&p.id)).unwrap();
        assert!(s.latest().unwrap().is_none());
        let c = p.finalize().unwrap();
        assert_eq!(s.latest().unwrap().unwrap().id, c.id);
        assert!(c.manifest.size_bytes > 3);
        assert!(p.finalized().is_some());
    }

    #[test]
    fn a_failed_dump_leaves_the_previous_checkpoint_latest() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let first = s.begin().unwrap();
        first.write_draft(&draft(&first.id)).unwrap();
        let first = first.finalize().unwrap();
        let second = s.begin().unwrap();
        second.discard();
        assert_eq!(s.latest().unwrap().unwrap().id, first.id);
    }

    #[test]
    fn quarantine_moves_the_checkpoint_and_records_why() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let p = s.begin().unwrap();
        p.write_draft(&draft(&p.id)).unwrap();
        let c = p.finalize().unwrap();
        let to = s.quarantine(&c.id, "restore failed").unwrap();
        assert!(s.latest().unwrap().is_none());
        assert_eq!(fs::read_to_string(to.join(QUARANTINE_REASON_FILE)).unwrap(), "restore failed\n");
    }

    #[test]
    fn damaged_manifests_are_listed_but_never_latest() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let p = s.begin().unwrap();
        p.write_draft(&draft(&p.id)).unwrap();
        let c = p.finalize().unwrap();
        fs::write(c.dir.join(MANIFEST_FILE), b"{").unwrap();
        assert!(s.latest().unwrap().is_none());
        assert!(s.list().unwrap()[0].manifest.is_err());
    }
}
