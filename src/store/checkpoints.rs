//! Checkpoint directories. A dump goes into `checkpoints/.incomplete-ID/`; finalizing fsyncs
//! every file (checksumming the images in the same pass), writes the manifest and renames the
//! directory to `checkpoints/ID/`. Only then is it a checkpoint, and nothing ever deletes or
//! rewrites the previous one before that. IDs start with the service's generation, so "newest"
//! never depends on the clock. Retention removes old checkpoints only after a newer one is durable.

use super::durable::{create_dir_with_mode, fsync_dir, write_atomic, write_atomic_with, Durability};
use super::finalize::fsync_and_hash;
use super::generation::{GenerationFile, Generations};
use super::manifest::IMAGES_DIR;
use super::manifest::{Manifest, HASH_ALGORITHM, MANIFEST_FILE};
use super::StoreError;
use crate::paths::ServicePaths;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

const INCOMPLETE_PREFIX: &str = ".incomplete-";
/// A checkpoint taken out of the store whose files are still to be deleted.
const REMOVED_PREFIX: &str = ".incomplete-removed-";
const DRAFT_FILE: &str = "manifest.draft.json";
pub const QUARANTINE_REASON_FILE: &str = "quarantine-reason.txt";
/// Written into a checkpoint that does not fit the program on disk; it is kept, not deleted.
pub const INCOMPATIBLE_FILE: &str = "incompatible.txt";
/// Quarantined checkpoints kept for inspection; older ones are deleted.
pub const QUARANTINE_KEEP: usize = 3;

#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    quarantine_dir: PathBuf,
    generations: PathBuf,
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

    /// Adds figures to the manifest (atomically): nothing the restore depends on changes.
    pub fn record_timings(&mut self, update: impl FnOnce(&mut super::manifest::Timings)) -> Result<(), StoreError> {
        let mut t = self.manifest.timings.clone().unwrap_or_default();
        update(&mut t);
        self.manifest.timings = Some(t);
        let bytes = self.manifest.to_sealed_bytes();
        // Whole either way: a power cut may only lose the figures.
        write_atomic_with(&self.dir.join(MANIFEST_FILE), &bytes, Durability::File)
    }

    /// Records that it does not fit (kept for a rollback of the program, or for inspection).
    pub fn mark_incompatible(&self, reason: &str) -> Result<(), StoreError> {
        write_atomic(&self.dir.join(INCOMPATIBLE_FILE), format!("{reason}\n").as_bytes())
    }

    /// Clears that record: the program on disk fits again.
    pub fn clear_incompatible(&self) {
        let _ = fs::remove_file(self.dir.join(INCOMPATIBLE_FILE));
    }
}

fn incompatible_reason(dir: &Path) -> Option<String> {
    fs::read_to_string(dir.join(INCOMPATIBLE_FILE)).ok().map(|s| s.trim().to_string())
}

/// A checkpoint being written; invisible to `latest()` until finalized.
#[derive(Debug, Clone)]
pub struct PendingCheckpoint {
    pub id: String,
    pub dir: PathBuf,
}

impl PendingCheckpoint {
    pub fn images_dir(&self) -> PathBuf {
        self.dir.join(IMAGES_DIR)
    }

    fn final_dir(&self) -> PathBuf {
        self.dir.with_file_name(&self.id)
    }

    pub fn read_draft(&self) -> Result<Manifest, StoreError> {
        read_draft(&self.dir.join(DRAFT_FILE))
    }

    pub fn write_draft(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let path = self.dir.join(DRAFT_FILE);
        let bytes = serde_json::to_vec_pretty(manifest).expect("manifest serializes");
        fs::write(&path, bytes).map_err(|source| StoreError::Write { path, source })
    }

    /// fsyncs everything, writes the manifest (from the draft) and makes the checkpoint visible.
    pub fn finalize(&self) -> Result<Checkpoint, StoreError> {
        self.finalize_sealed(None, &[])
    }

    /// The same, sealing every image with `key` first when the draft asks for encryption.
    /// Every image is hashed from its bytes on disk, in the pass that fsyncs it, except those in
    /// `received`: written (compressed, sealed) and hashed in one pass as they arrived.
    pub fn finalize_sealed(
        &self,
        key: Option<&super::seal::Key>,
        received: &[super::stored::Stored],
    ) -> Result<Checkpoint, StoreError> {
        // CRIU's link to the parent of an incremental dump: the manifest names the parent, and
        // a restore reads it from there (store::chain), never through a link.
        let link = self.images_dir().join("parent");
        if fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            fs::remove_file(&link).map_err(|source| StoreError::Write { path: link.clone(), source })?;
        }
        let draft_path = self.dir.join(DRAFT_FILE);
        let mut manifest = read_draft(&draft_path)?;
        fs::remove_file(&draft_path).map_err(|source| StoreError::Write { path: draft_path.clone(), source })?;
        let t0 = std::time::Instant::now();
        if let Some(c) = &manifest.compression {
            super::compress::compress_pages(&self.images_dir(), c.level)?;
        }
        if manifest.encryption.is_some() {
            if let Some(key) = key {
                super::seal::seal_dir(&self.images_dir(), key)?;
            }
            // Never durable in the clear: every image must be sealed by now.
            if let Some(plain) = super::seal::first_unsealed(&self.images_dir()) {
                return Err(StoreError::Write {
                    path: plain,
                    source: std::io::Error::other(
                        "an image of an encrypted checkpoint is not sealed (no key to seal it with)",
                    ),
                });
            }
        }
        let synced = fsync_and_hash(&self.dir, IMAGES_DIR, received)?;
        // A dump that wrote nothing is no checkpoint (and its manifest would not be a valid one).
        if synced.hashed.is_empty() {
            return Err(StoreError::NoImages { dir: self.images_dir() });
        }
        manifest.hash_algorithm = Some(HASH_ALGORITHM.to_string());
        let bytes_written = synced.hashed.iter().map(|f| f.size).sum();
        manifest.images = Some(synced.hashed);
        // Figures the caller put in the draft (a dump that left the service running knows its
        // own before this) stay: the manifest is complete the moment the checkpoint appears.
        let mut timings = manifest.timings.take().unwrap_or_default();
        timings.fsync_ms = Some(t0.elapsed().as_millis() as u64);
        timings.bytes_written = Some(bytes_written);
        manifest.timings = Some(timings);
        manifest.format = super::manifest::FORMAT;
        let bytes = manifest.to_sealed_bytes();
        manifest.size_bytes = synced.total_bytes + bytes.len() as u64;
        let bytes = manifest.to_sealed_bytes();
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

impl ListedCheckpoint {
    pub fn generation(&self) -> Option<u64> {
        match &self.manifest {
            Ok(m) => m.generation,
            Err(_) => generation_of_id(&self.id),
        }
    }

    pub fn incompatible(&self) -> Option<String> {
        incompatible_reason(&self.dir)
    }

    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.manifest.as_ref().ok().map(|m| Checkpoint {
            id: self.id.clone(),
            dir: self.dir.clone(),
            manifest: m.clone(),
        })
    }
}

/// One directory under `quarantine/`: a checkpoint that failed verification or its restore.
#[derive(Debug, Clone)]
pub struct QuarantinedCheckpoint {
    /// The directory's name: the checkpoint's id, with `-N` when that id was quarantined before.
    pub name: String,
    pub dir: PathBuf,
    /// Why it was quarantined (`quarantine-reason.txt`).
    pub reason: Option<String>,
    /// Read as any manifest: its own checksum and required keys checked.
    pub manifest: Result<Manifest, String>,
}

impl QuarantinedCheckpoint {
    /// The checkpoint's own id: the manifest's when it can be read, else the directory's name.
    pub fn id(&self) -> &str {
        self.manifest.as_ref().map(|m| m.id.as_str()).unwrap_or(&self.name)
    }
}

/// The generation an id starts with (`00000042-20261204T...`), if it has one.
pub fn generation_of_id(id: &str) -> Option<u64> {
    let (g, _) = id.split_once('-')?;
    (g.len() == 8 && g.bytes().all(|b| b.is_ascii_digit())).then(|| g.parse().ok()).flatten()
}

impl CheckpointStore {
    pub fn new(paths: &ServicePaths) -> Self {
        CheckpointStore {
            dir: paths.checkpoints(),
            quarantine_dir: paths.quarantine(),
            generations: paths.root.clone(),
        }
    }

    fn generation_file(&self) -> GenerationFile {
        GenerationFile::new(&self.generations)
    }

    /// The service's counters, as recorded (enough to tell fresh from stale).
    pub fn generations(&self) -> Generations {
        self.generation_file().load(|| self.highest_generation())
    }

    /// The counters to update: never lower than any generation on disk, so a lost or restored
    /// counter file cannot hand out a number twice.
    fn counters_for_update(&self) -> Generations {
        let mut g = self.generations();
        g.last = g.last.max(self.highest_generation());
        g
    }

    fn highest_generation(&self) -> u64 {
        let listed = self.list().unwrap_or_default();
        let quarantined = fs::read_dir(&self.quarantine_dir)
            .map(|rd| {
                rd.filter_map(Result::ok).filter_map(|e| generation_of_id(&e.file_name().to_string_lossy())).max()
            })
            .ok()
            .flatten();
        listed.iter().filter_map(ListedCheckpoint::generation).chain(quarantined).max().unwrap_or(0)
    }

    /// Takes the next generation number, durably.
    pub fn take_generation(&self) -> Result<u64, StoreError> {
        let mut g = self.counters_for_update();
        g.last += 1;
        self.generation_file().save(&g)?;
        Ok(g.last)
    }

    /// Records that the service is about to run (`how`: restored from X, cold start), which
    /// makes every existing checkpoint stale. Durable before it returns; the previous counters
    /// are returned so a run that never happened (its start failed) can be taken back.
    pub fn record_run(&self, how: &str) -> Result<Generations, StoreError> {
        let before = self.counters_for_update();
        let mut g = before.clone();
        g.last += 1;
        g.last_run = g.last;
        g.last_run_at = Some(crate::time_fmt::rfc3339_utc(SystemTime::now()));
        g.last_run_how = Some(how.to_string());
        self.generation_file().save(&g)?;
        Ok(before)
    }

    /// Takes back a run recorded by `record_run` that did not happen (CRIU or the launch failed
    /// before the service ran). The counter keeps rising; only the run marker goes back.
    pub fn undo_run(&self, before: &Generations) -> Result<(), StoreError> {
        let mut g = self.counters_for_update();
        g.last_run = before.last_run;
        g.last_run_at = before.last_run_at.clone();
        g.last_run_how = before.last_run_how.clone();
        self.generation_file().save(&g)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn quarantine_dir(&self) -> &Path {
        &self.quarantine_dir
    }

    /// Starts a new checkpoint directory (root-only) whose id begins with `generation`.
    pub fn begin(&self, generation: u64) -> Result<PendingCheckpoint, StoreError> {
        create_dir_with_mode(&self.dir, 0o700)?;
        let base = format!("{generation:08}-{}", crate::time_fmt::compact_utc(SystemTime::now()));
        for n in 0..100 {
            let id = if n == 0 { base.clone() } else { format!("{base}-{n}") };
            if self.dir.join(&id).exists() {
                continue;
            }
            let dir = self.dir.join(format!("{INCOMPLETE_PREFIX}{id}"));
            let made = {
                use std::os::unix::fs::DirBuilderExt;
                fs::DirBuilder::new().mode(0o700).create(&dir)
            };
            match made {
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

    /// All checkpoint directories, oldest first (by generation); damaged ones carry the reason.
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
        // Format 1 ids (the UTC time alone) have no generation and come first, by time.
        out.sort_by(|a, b| (a.generation().unwrap_or(0), &a.id).cmp(&(b.generation().unwrap_or(0), &b.id)));
        Ok(out)
    }

    /// One checkpoint by id.
    pub fn get(&self, id: &str) -> Result<Option<ListedCheckpoint>, StoreError> {
        Ok(self.list()?.into_iter().find(|c| c.id == id))
    }

    /// What retention removes to keep the `keep` newest good checkpoints: every directory older
    /// than the `keep`-th newest good one, damaged or not, except the parents a kept one needs
    /// (pinned). Newest first is never touched.
    pub fn beyond_retention(&self, keep: usize) -> Result<Vec<ListedCheckpoint>, StoreError> {
        let all = self.list()?;
        let good: Vec<usize> = all.iter().enumerate().filter(|(_, c)| c.manifest.is_ok()).map(|(i, _)| i).collect();
        if keep == 0 || good.len() <= keep {
            return Ok(Vec::new());
        }
        let oldest_kept = good[good.len() - keep];
        // An incremental checkpoint kept keeps its parents (store::chain): they go with it.
        let kept: Vec<&ListedCheckpoint> = all[oldest_kept..].iter().collect();
        let pinned = super::chain::pinned_by(&all, &kept);
        Ok(all[..oldest_kept].iter().filter(|c| !pinned.contains(&c.id)).cloned().collect())
    }

    /// Deletes one checkpoint directory (retention). The caller has released what it held.
    /// Takes the checkpoint out of the store at once (one rename, made durable); its files are
    /// deleted by [`CheckpointStore::purge_removed`], which the supervisor runs off the path
    /// that someone waits on. A crash in between leaves a directory nothing lists or restores.
    pub fn remove(&self, c: &ListedCheckpoint) -> Result<(), StoreError> {
        let doomed = self.dir.join(format!("{REMOVED_PREFIX}{}", c.id));
        fs::rename(&c.dir, &doomed).map_err(|source| StoreError::Rename {
            from: c.dir.clone(),
            to: doomed.clone(),
            source,
        })?;
        fsync_dir(&self.dir)
    }

    /// Deletes the files of removed checkpoints. Two supervisors (one ending, one starting) may
    /// run this at once: whatever one deletes, the other skips.
    pub fn purge_removed(&self) {
        let Ok(rd) = fs::read_dir(&self.dir) else { return };
        for e in rd.filter_map(Result::ok) {
            if e.file_name().to_str().is_some_and(|n| n.starts_with(REMOVED_PREFIX)) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// Deletes all but the newest [`QUARANTINE_KEEP`] quarantined checkpoints.
    pub fn trim_quarantine(&self) {
        let Ok(rd) = fs::read_dir(&self.quarantine_dir) else { return };
        let mut q: Vec<(std::time::SystemTime, PathBuf)> =
            rd.filter_map(Result::ok).filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path()))).collect();
        q.sort();
        let excess = q.len().saturating_sub(QUARANTINE_KEEP);
        for (_, p) in q.into_iter().take(excess) {
            let _ = fs::remove_dir_all(p);
        }
    }

    /// The namespace-init binaries that the manifests in this store (kept and quarantined) need.
    pub fn referenced_init_binaries(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| c.manifest.ok())
            .map(|m| m.init_binary)
            .collect();
        if let Ok(rd) = fs::read_dir(&self.quarantine_dir) {
            out.extend(
                rd.filter_map(Result::ok)
                    .filter_map(|e| read_manifest(&e.path().join(MANIFEST_FILE)).ok())
                    .map(|m| m.init_binary),
            );
        }
        out
    }

    /// The newest complete checkpoint with a readable manifest.
    pub fn latest(&self) -> Result<Option<Checkpoint>, StoreError> {
        Ok(self.list()?.into_iter().rev().find_map(|c| c.checkpoint()))
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

    /// The quarantined checkpoints, oldest first, each with its reason.
    pub fn quarantined(&self) -> Vec<QuarantinedCheckpoint> {
        let Ok(rd) = fs::read_dir(self.quarantine_dir()) else { return Vec::new() };
        let mut out: Vec<QuarantinedCheckpoint> = rd
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let dir = e.path();
                Some(QuarantinedCheckpoint {
                    reason: fs::read_to_string(dir.join(QUARANTINE_REASON_FILE)).ok().map(|s| s.trim().to_string()),
                    manifest: read_manifest(&dir.join(MANIFEST_FILE)).map_err(|e| e.to_string()),
                    name,
                    dir,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            (generation_of_id(&a.name).unwrap_or(0), &a.name).cmp(&(generation_of_id(&b.name).unwrap_or(0), &b.name))
        });
        out
    }

    /// A quarantined checkpoint by id (or by its directory's name, `ID-N`).
    pub fn find_quarantined(&self, id: &str) -> Option<QuarantinedCheckpoint> {
        let all = self.quarantined();
        // The exact directory first: an id quarantined twice has `ID` and `ID-1`.
        let exact = all.iter().position(|q| q.name == id);
        exact.or_else(|| all.iter().rposition(|q| q.id() == id)).map(|i| all[i].clone())
    }

    /// Moves a quarantined checkpoint back into the store under its own id. The caller has
    /// verified it (manifest, images, program); the reason it was quarantined goes with the move.
    pub fn unquarantine(&self, q: &QuarantinedCheckpoint) -> Result<Checkpoint, StoreError> {
        let manifest =
            q.manifest.clone().map_err(|reason| StoreError::BadManifest { path: q.dir.join(MANIFEST_FILE), reason })?;
        create_dir_with_mode(&self.dir, 0o700)?;
        let to = self.dir.join(&manifest.id);
        if to.exists() {
            return Err(StoreError::Rename {
                from: q.dir.clone(),
                to,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a checkpoint with that id is in the store",
                ),
            });
        }
        fs::rename(&q.dir, &to).map_err(|source| StoreError::Rename { from: q.dir.clone(), to: to.clone(), source })?;
        fsync_dir(&self.dir)?;
        fsync_dir(&self.quarantine_dir)?;
        let _ = fs::remove_file(to.join(QUARANTINE_REASON_FILE));
        Ok(Checkpoint { id: manifest.id.clone(), dir: to, manifest })
    }

    /// Every directory that may hold a dump's log: checkpoints (complete or not) and quarantine.
    pub fn all_dump_dirs(&self) -> Vec<PathBuf> {
        [&self.dir, &self.quarantine_dir]
            .iter()
            .filter_map(|d| fs::read_dir(d).ok())
            .flat_map(|rd| rd.filter_map(Result::ok).map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect()
    }

    /// Refuses a store that someone other than root could have written: its checkpoints could
    /// hold anybody's memory. The service's state dir and `checkpoints/` must be root's and
    /// writable by root alone; one that others could only read is closed to 0700 (returned, to
    /// be logged), since memory images hold secrets.
    pub fn check_private(&self) -> Result<Vec<PathBuf>, StoreError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mut tightened = Vec::new();
        for dir in [self.generations.as_path(), self.dir.as_path()] {
            let m = match fs::symlink_metadata(dir) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(StoreError::Read { path: dir.to_path_buf(), source }),
            };
            if m.is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0 && m.mode() & 0o077 != 0 {
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                    .map_err(|source| StoreError::Write { path: dir.to_path_buf(), source })?;
                tightened.push(dir.to_path_buf());
                continue;
            }
            if !m.is_dir() || m.uid() != 0 || m.mode() & 0o077 != 0 {
                return Err(StoreError::NotPrivate {
                    path: dir.to_path_buf(),
                    found: if m.is_dir() {
                        format!("owner uid {}, mode {:o}", m.uid(), m.mode() & 0o7777)
                    } else {
                        "not a directory (a symlink?)".to_string()
                    },
                });
            }
        }
        Ok(tightened)
    }

    /// Leftovers of dumps that never completed (a crash mid-dump) or of interrupted removals.
    pub fn incomplete(&self) -> Vec<PathBuf> {
        fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(INCOMPLETE_PREFIX)))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes those leftovers. They were never checkpoints, so nothing restorable is lost.
    /// Deletes dumps cut short. Removed checkpoints are left to [`CheckpointStore::purge_removed`].
    pub fn remove_incomplete(&self) {
        for dir in self.incomplete() {
            if !dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(REMOVED_PREFIX)) {
                let _ = fs::remove_dir_all(dir);
            }
        }
    }
}

/// A complete checkpoint's manifest: its checksum and required keys checked before any use.
pub(crate) fn read_manifest(path: &Path) -> Result<Manifest, StoreError> {
    let bytes = fs::read(path).map_err(|source| StoreError::Read { path: path.to_path_buf(), source })?;
    Manifest::from_sealed_bytes(&bytes)
        .map_err(|e| StoreError::BadManifest { path: path.to_path_buf(), reason: e.to_string() })
}

/// The draft of a dump under way: stasis's own, in a root-only directory, not yet complete.
fn read_draft(path: &Path) -> Result<Manifest, StoreError> {
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
            format: 2,
            id: id.into(),
            generation: generation_of_id(id),
            kernel_version: Some("6.18".into()),
            config_digest: Some("c".into()),
            hash_algorithm: None,
            images: None,
            executables: Some(Vec::new()),
            timings: None,
            compression: None,
            encryption: None,
            shm_files: None,
            tmpfs_dirs: None,
            tmpfs_files: None,
            written_files: None,
            parent: None,
            pre_copy: None,
            unknown: Default::default(),
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

    fn begin(s: &CheckpointStore) -> PendingCheckpoint {
        let g = s.take_generation().unwrap();
        s.begin(g).unwrap()
    }

    fn finalized(s: &CheckpointStore) -> Checkpoint {
        let p = begin(s);
        fs::write(p.images_dir().join("pages-1.img"), b"pages").unwrap();
        p.write_draft(&draft(&p.id)).unwrap();
        p.finalize().unwrap()
    }

    #[test]
    fn ids_carry_the_generation_and_order_ignores_the_clock() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let a = finalized(&s);
        let b = finalized(&s);
        assert_eq!(a.manifest.generation, Some(1));
        assert!(a.id.starts_with("00000001-"), "{}", a.id);
        // A clock step back: a later checkpoint whose time sorts first is still the newest.
        let late = s.dir().join("00000003-19700101T000000.000Z");
        fs::rename(&b.dir, &late).unwrap();
        assert_eq!(s.latest().unwrap().unwrap().id, "00000003-19700101T000000.000Z");
        assert_eq!(s.take_generation().unwrap(), 3, "the counter is durable");
    }

    #[test]
    fn finalize_records_a_checksum_for_every_image() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let c = finalized(&s);
        let images = c.manifest.images.unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].path, "images/pages-1.img");
        assert_eq!(images[0].hash, blake3::hash(b"pages").to_hex().to_string());
    }

    #[test]
    fn retention_keeps_the_newest_good_ones() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let ids: Vec<String> = (0..4).map(|_| finalized(&s).id).collect();
        fs::write(s.dir().join(&ids[3]).join(MANIFEST_FILE), b"{").unwrap();
        let doomed: Vec<String> = s.beyond_retention(2).unwrap().into_iter().map(|c| c.id).collect();
        assert_eq!(doomed, vec![ids[0].clone()], "the damaged newest does not count as good");
        for c in s.beyond_retention(2).unwrap() {
            s.remove(&c).unwrap();
        }
        let left: Vec<String> = s.list().unwrap().into_iter().map(|c| c.id).collect();
        assert_eq!(left, ids[1..].to_vec());
        let removed = s.dir().join(format!("{REMOVED_PREFIX}{}", ids[0]));
        assert!(removed.is_dir(), "removed out of sight, deleted later");
        s.remove_incomplete();
        assert!(removed.is_dir(), "a start leaves it to the purge");
        s.purge_removed();
        assert!(!removed.exists());
        assert!(s.beyond_retention(5).unwrap().is_empty());
    }

    /// Incremental checkpoints pin their parents: retention never takes a parent a kept
    /// checkpoint needs, and takes the whole chain once a newer full one is kept.
    #[test]
    fn retention_keeps_the_parents_of_kept_checkpoints() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let on = |parent: Option<&Checkpoint>| {
            let p = begin(&s);
            fs::write(p.images_dir().join("pages-1.img"), b"pages").unwrap();
            let mut m = draft(&p.id);
            m.parent =
                parent.map(|c| crate::store::ParentRef { id: c.id.clone(), content_hash: c.manifest.content_hash() });
            p.write_draft(&m).unwrap();
            p.finalize().unwrap()
        };
        let a = on(None);
        let b = on(Some(&a));
        let c = on(Some(&b));
        assert!(s.beyond_retention(1).unwrap().is_empty(), "c needs b, which needs a");
        let _d = on(None);
        let doomed: Vec<String> = s.beyond_retention(1).unwrap().into_iter().map(|c| c.id).collect();
        assert_eq!(doomed, vec![a.id, b.id, c.id], "a newer full one kept: the chain goes");
    }

    #[test]
    fn a_recorded_run_makes_checkpoints_stale_and_can_be_undone() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let c = finalized(&s);
        use crate::store::generation::Freshness;
        assert_eq!(s.generations().freshness(c.manifest.generation, DumpKind::Stop), Freshness::Fresh);
        let before = s.record_run("cold start").unwrap();
        assert!(matches!(s.generations().freshness(c.manifest.generation, DumpKind::Stop), Freshness::Stale(_)));
        s.undo_run(&before).unwrap();
        assert_eq!(s.generations().freshness(c.manifest.generation, DumpKind::Stop), Freshness::Fresh);
        assert!(finalized(&s).manifest.generation > c.manifest.generation);
    }

    #[test]
    fn pending_checkpoints_are_invisible_until_finalized() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let p = begin(&s);
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
        let first = finalized(&s);
        let second = begin(&s);
        second.discard();
        assert_eq!(s.latest().unwrap().unwrap().id, first.id);
    }

    #[test]
    fn quarantine_moves_the_checkpoint_and_records_why() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let p = begin(&s);
        fs::write(p.images_dir().join("pages-1.img"), b"pages").unwrap();
        p.write_draft(&draft(&p.id)).unwrap();
        let c = p.finalize().unwrap();
        let to = s.quarantine(&c.id, "restore failed").unwrap();
        assert!(s.latest().unwrap().is_none());
        assert_eq!(fs::read_to_string(to.join(QUARANTINE_REASON_FILE)).unwrap(), "restore failed\n");
    }

    #[test]
    fn a_quarantined_checkpoint_is_listed_with_its_reason_and_can_come_back() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let c = finalized(&s);
        s.quarantine(&c.id, "restore failed: a directory was missing").unwrap();
        // Quarantined twice (brought back, failed again): the newest is found by id.
        let again = s.quarantine_dir().join(format!("{}-1", c.id));
        fs::create_dir_all(s.quarantine_dir().join(&c.id)).unwrap();
        fs::rename(s.quarantine_dir().join(&c.id), &again).unwrap();
        let twin = s.quarantine_dir().join(&c.id);
        fs::create_dir(&twin).unwrap();
        let listed = s.quarantined();
        assert_eq!(listed.len(), 2);
        let q = s.find_quarantined(&format!("{}-1", c.id)).unwrap();
        assert_eq!(q.reason.as_deref(), Some("restore failed: a directory was missing"));
        assert_eq!(q.id(), c.id);
        assert!(s.find_quarantined(&c.id).unwrap().manifest.is_err(), "the exact name first");
        fs::remove_dir(&twin).unwrap();
        let q = s.find_quarantined(&c.id).unwrap();
        let back = s.unquarantine(&q).unwrap();
        assert_eq!(s.latest().unwrap().unwrap().id, c.id);
        assert!(!back.dir.join(QUARANTINE_REASON_FILE).exists());
        assert!(s.quarantined().is_empty());
    }

    #[test]
    fn damaged_manifests_are_listed_but_never_latest() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let p = begin(&s);
        fs::write(p.images_dir().join("pages-1.img"), b"pages").unwrap();
        p.write_draft(&draft(&p.id)).unwrap();
        let c = p.finalize().unwrap();
        fs::write(c.dir.join(MANIFEST_FILE), b"{").unwrap();
        assert!(s.latest().unwrap().is_none());
        assert!(s.list().unwrap()[0].manifest.is_err());
    }
}
