//! What stasis does at CRIU's `post-dump` notification, in this process, while the tree is
//! still frozen and CRIU waits for the answer: refuse a dump that could not be restored, record
//! what the restore will need of the host (the frozen tree's executable mappings, /dev/shm
//! copies, the socket directories and small files of /run, the files the tree writes), and for
//! a stopping dump make the checkpoint durable. Any failure is a refusal: CRIU then resumes the
//! tree instead of ending it, so a service is never gone without a durable checkpoint.

use crate::store::{Checkpoint, Manifest, PendingCheckpoint, StoreError};
use std::path::PathBuf;
use std::time::Instant;

/// The frozen tree and the checkpoint being written of it.
pub struct Frozen<'a> {
    pub pending: &'a PendingCheckpoint,
    /// Host PID of the tree's root (the namespace init).
    pub tree_pid: i32,
    /// The hash cache the dump filled just before CRIU ran.
    pub hash_cache: PathBuf,
    /// The service's `min_free_bytes`: copies taken here must leave that much free.
    pub min_free: u64,
    /// The end of `dump_timeout`: reads of the service's files give up then, naming the file.
    pub deadline: Instant,
}

/// Why the dump was refused at `post-dump`.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A process had a file of a /proc/PID directory open: it names the host PID, which the
    /// restored process will not have. Passing: redis reads /proc/self/stat every so often.
    #[error("failed to take a checkpoint that would restore: pid {pid} had {} open at the freeze (a file of a process's /proc directory names its host PID, which a restore cannot give back)", path.display())]
    ProcFileOpen { pid: i32, path: PathBuf },
    #[error("{0}")]
    Store(#[from] StoreError),
    /// An executable mapping could not be read as the object the process maps.
    #[error("{0}")]
    Unsafe(#[from] crate::store::safe_open::UnsafeFile),
    #[error("{0}")]
    Files(String),
}

impl Refusal {
    /// Whether the same dump may well work a moment later.
    pub fn passing(&self) -> bool {
        matches!(self, Refusal::ProcFileOpen { .. })
    }
}

impl Frozen<'_> {
    /// Everything of a dump that keeps the service running: the checks and the records; the
    /// checkpoint is finalized after CRIU returns.
    pub fn check_and_record(&self) -> Result<(), Refusal> {
        self.refuse_unrestorable()?;
        let mut draft = self.pending.read_draft()?;
        self.keep_shm_files(&mut draft)?;
        self.keep_open_files(&mut draft)?;
        Ok(self.pending.write_draft(&draft)?)
    }

    /// Everything of a stopping dump before it is made durable: the checks, the records and
    /// the frozen tree's mappings. The draft is read and written once: the tree is frozen
    /// meanwhile. [`Self::finalize`] follows, unless the caller refuses first.
    pub fn check_and_record_frozen(&self) -> Result<(), Refusal> {
        self.refuse_unrestorable()?;
        let mut draft = self.pending.read_draft()?;
        self.record_frozen_mappings(&mut draft)?;
        self.keep_shm_files(&mut draft)?;
        self.keep_open_files(&mut draft)?;
        Ok(self.pending.write_draft(&draft)?)
    }

    /// The checkpoint of a stopping dump made durable: the images the page server wrote were
    /// hashed as they were written, every other one is hashed from the disk (never inferred).
    pub fn finalize(
        &self,
        key: Option<&crate::store::seal::Key>,
        received: &crate::criu::page_server::Received,
    ) -> Result<Checkpoint, Refusal> {
        Ok(self.pending.finalize_sealed(key, &received.images)?)
    }

    fn refuse_unrestorable(&self) -> Result<(), Refusal> {
        match crate::process::tree::open_pid_proc_file(self.tree_pid) {
            Some((pid, path)) => Err(Refusal::ProcFileOpen { pid, path }),
            None => Ok(()),
        }
    }

    /// The tree is frozen now, so its mappings are exactly what the images hold; the list taken
    /// while it ran is replaced. Hashes come from the cache the dump just filled.
    fn record_frozen_mappings(&self, draft: &mut Manifest) -> Result<(), Refusal> {
        let mut cache = crate::store::identity::HashCache::load(self.hash_cache.clone());
        draft.executables =
            Some(crate::process::tree::executable_identities(self.tree_pid, &mut cache, Some(self.deadline))?);
        Ok(())
    }

    /// Copies the /dev/shm files the frozen tree uses into the checkpoint (store::shm).
    fn keep_shm_files(&self, draft: &mut Manifest) -> Result<(), Refusal> {
        let handles = crate::process::tree::shm_handles(self.tree_pid);
        if handles.is_empty() {
            return Ok(());
        }
        let images = self.pending.images_dir();
        let kept = crate::store::shm::capture(&handles, &images, self.min_free, Some(self.deadline))?;
        draft.shm_files = (!kept.is_empty()).then_some(kept);
        Ok(())
    }

    /// Records what a restore needs of the files the frozen tree holds open: the directories of
    /// its unix sockets and its small files on /run or a tmpfs (store::tmpfs), and the files it
    /// writes (store::written); small ones are copied into the checkpoint.
    fn keep_open_files(&self, draft: &mut Manifest) -> Result<(), Refusal> {
        let fds = crate::process::tree::tree_fds(self.tree_pid);
        let images = self.pending.images_dir();
        let deadline = Some(self.deadline);
        let files = |e: &dyn std::fmt::Display| Refusal::Files(e.to_string());
        let (dirs, tmp) =
            crate::store::tmpfs::capture(&fds, &images, self.min_free, deadline).map_err(|e| files(&e))?;
        let written = crate::store::written::capture(&fds, &images, self.min_free, deadline).map_err(|e| files(&e))?;
        draft.tmpfs_dirs = (!dirs.is_empty()).then_some(dirs);
        draft.tmpfs_files = (!tmp.is_empty()).then_some(tmp);
        draft.written_files = (!written.is_empty()).then_some(written);
        Ok(())
    }
}
