//! CRIU's action script (`--action-script`), which is this binary run with no arguments.
//! On `post-dump` it finalizes the pending checkpoint while the service is still frozen: if
//! making it durable fails, the hook exits non-zero and CRIU resumes the service instead of
//! killing it, so a service is never gone without a durable checkpoint. On every dump it also
//! records, from the frozen tree, what the restore will need of the host: /dev/shm copies
//! (store::shm), the socket directories and small files of /run (store::tmpfs), and the files
//! the tree writes (store::written).

/// The pending checkpoint directory to finalize; only set for dumps that stop the service.
pub const PENDING_ENV: &str = "STASIS_PENDING_CHECKPOINT";
/// Host PID of the dumped tree's root: its executable mappings are re-read while it is frozen.
pub const TREE_PID_ENV: &str = "STASIS_TREE_PID";
/// The hash cache the supervisor filled just before the dump.
pub const HASH_CACHE_ENV: &str = "STASIS_HASH_CACHE";
/// Left in the pending checkpoint when the hook refused a dump that could not be restored but
/// would be fine a moment later: the supervisor then tries again.
pub const RETRY_MARKER: &str = "retry-dump";
/// The service's `encryption_key_file`, when its images are to be sealed.
pub const KEY_FILE_ENV: &str = "STASIS_KEY_FILE";
/// When the dump's `dump_timeout` ends, as CLOCK_MONOTONIC nanoseconds (the same clock in every
/// process): the hook's reads of the service's files give up then, naming the file, rather
/// than be killed with the rest of the dump without a word.
pub const DEADLINE_ENV: &str = "STASIS_DUMP_DEADLINE_NS";
/// The service's `min_free_bytes`: the /dev/shm copies must leave that much free.
pub const MIN_FREE_ENV: &str = "STASIS_MIN_FREE_BYTES";
/// A dump that keeps the service running: the hook only checks the frozen tree, and leaves the
/// marker in this directory.
pub const CHECK_ONLY_ENV: &str = "STASIS_CHECK_DUMP";

pub fn main() -> i32 {
    if std::env::var("CRTOOLS_SCRIPT_ACTION").as_deref() != Ok("post-dump") {
        return 0;
    }
    let Some(dir) = std::env::var_os(PENDING_ENV) else {
        let Some(dir) = std::env::var_os(CHECK_ONLY_ENV) else { return 0 };
        if refuse_unrestorable(std::path::Path::new(&dir)) {
            return 1;
        }
        // The service runs on after this dump: its shared memory is copied now or never.
        let pending = crate::store::PendingCheckpoint::from_dir(std::path::Path::new(&dir));
        return match pending.map(|p| keep_shm_files(&p).map_err(|e| e.to_string()).and_then(|_| keep_open_files(&p))) {
            Some(Err(e)) => {
                eprintln!("stasis: {e}");
                1
            }
            _ => 0,
        };
    };
    let Some(pending) = crate::store::PendingCheckpoint::from_dir(std::path::Path::new(&dir)) else {
        eprintln!("stasis: {} is not a pending checkpoint directory", std::path::Path::new(&dir).display());
        return 1;
    };
    // A process caught reading a /proc/PID file (redis reads /proc/self/stat every so often)
    // has it open under its host PID, which the restored process will not have: such a
    // checkpoint fails to restore. Refuse it now (CRIU resumes the service) and let the
    // supervisor dump again a moment later.
    if refuse_unrestorable(&pending.dir) {
        return 1;
    }
    if let Err(e) = record_frozen_mappings(&pending).and_then(|_| keep_shm_files(&pending)) {
        eprintln!("stasis: {e}");
        return 1;
    }
    if let Err(e) = keep_open_files(&pending) {
        eprintln!("stasis: {e}");
        return 1;
    }
    let key = match std::env::var_os(KEY_FILE_ENV).map(|p| crate::store::seal::Key::load(std::path::Path::new(&p))) {
        Some(Ok(k)) => Some(k),
        Some(Err(e)) => {
            eprintln!("stasis: {e}");
            return 1;
        }
        None => None,
    };
    // Every image is hashed here, from the bytes on disk, while the tree is still frozen: a
    // hash is never inferred from a size, so a stopping service's checkpoint cannot be recorded
    // with a hash its images do not have (and be quarantined at the next start, its memory lost).
    match pending.finalize_sealed(key.as_ref()) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("stasis: {e}");
            1
        }
    }
}

/// Whether the frozen tree holds something its restore could not give back; if so the marker
/// is left in `dir` for the supervisor.
fn refuse_unrestorable(dir: &std::path::Path) -> bool {
    let found = tree_pid().and_then(crate::process::tree::open_pid_proc_file);
    match found {
        Some((pid, path)) => {
            let _ = std::fs::write(dir.join(RETRY_MARKER), format!("pid {pid} had {} open\n", path.display()));
            eprintln!("stasis: pid {pid} had {} open at the freeze; the dump is refused", path.display());
            true
        }
        None => false,
    }
}

/// CRIU executes the action script by path with no arguments, so the binary recognises the
/// role from CRIU's environment.
pub fn invoked_as_hook(args: &[std::ffi::OsString]) -> bool {
    args.len() == 1 && std::env::var_os("CRTOOLS_SCRIPT_ACTION").is_some()
}

/// The `--action-script` value that runs this binary's hook.
pub fn script_for(exe: &std::path::Path) -> String {
    exe.display().to_string()
}

/// The tree is frozen now, so its mappings are exactly what the images hold; the supervisor's
/// list (taken while it ran) is replaced. Hashes come from the cache it just filled.
fn record_frozen_mappings(pending: &crate::store::PendingCheckpoint) -> Result<(), crate::store::StoreError> {
    let Some(pid) = tree_pid() else {
        return Ok(());
    };
    let mut cache = match std::env::var_os(HASH_CACHE_ENV) {
        Some(p) => crate::store::identity::HashCache::load(p.into()),
        None => crate::store::identity::HashCache::in_memory(),
    };
    let mut draft = pending.read_draft()?;
    draft.executables = Some(crate::process::tree::executable_identities(pid, &mut cache, deadline())?);
    pending.write_draft(&draft)
}

/// Copies the /dev/shm files the frozen tree uses into the pending checkpoint and lists them in
/// its draft manifest (see store::shm).
fn keep_shm_files(pending: &crate::store::PendingCheckpoint) -> Result<(), crate::store::StoreError> {
    let Some(pid) = tree_pid() else {
        return Ok(());
    };
    let handles = crate::process::tree::shm_handles(pid);
    if handles.is_empty() {
        return Ok(());
    }
    let min_free = std::env::var(MIN_FREE_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let kept = crate::store::shm::capture(&handles, &pending.images_dir(), min_free, deadline())?;
    if kept.is_empty() {
        return Ok(());
    }
    let mut draft = pending.read_draft()?;
    draft.shm_files = Some(kept);
    pending.write_draft(&draft)
}

/// Records what a restore needs of the files the frozen tree holds open: the directories of its
/// unix sockets and its small files on /run or a tmpfs (store::tmpfs), and the files it writes
/// (store::written); small ones are copied into the pending checkpoint.
fn keep_open_files(pending: &crate::store::PendingCheckpoint) -> Result<(), String> {
    let Some(pid) = tree_pid() else {
        return Ok(());
    };
    let fds = crate::store::written::tree_fds(pid);
    let min_free = std::env::var(MIN_FREE_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let images = pending.images_dir();
    let (dirs, files) = crate::store::tmpfs::capture(&fds, &images, min_free, deadline()).map_err(|e| e.to_string())?;
    let written = crate::store::written::capture(&fds, &images, min_free, deadline()).map_err(|e| e.to_string())?;
    if dirs.is_empty() && files.is_empty() && written.is_empty() {
        return Ok(());
    }
    let mut draft = pending.read_draft().map_err(|e| e.to_string())?;
    draft.tmpfs_dirs = (!dirs.is_empty()).then_some(dirs);
    draft.tmpfs_files = (!files.is_empty()).then_some(files);
    draft.written_files = (!written.is_empty()).then_some(written);
    pending.write_draft(&draft).map_err(|e| e.to_string())
}

/// Host PID of the dumped tree's root, as the supervisor passed it.
fn tree_pid() -> Option<i32> {
    std::env::var(TREE_PID_ENV).ok()?.parse().ok()
}

/// Now on CLOCK_MONOTONIC, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: one valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The deadline the supervisor passed (see `DEADLINE_ENV`), as an Instant of this process.
fn deadline() -> Option<std::time::Instant> {
    let at: u64 = std::env::var(DEADLINE_ENV).ok()?.parse().ok()?;
    Some(std::time::Instant::now() + std::time::Duration::from_nanos(at.saturating_sub(monotonic_ns())))
}
