//! Regular files the service writes. CRIU records an open file's path and size and, at the
//! restore, reopens the path and checks only the size: a file that grew after a periodic
//! checkpoint fails the restore, and one rewritten to the same size is restored under memory
//! that no longer matches it. So each file the frozen tree holds open for writing is recorded
//! with its size and a BLAKE3 of its content (and a copy in `images/` when small), and before a
//! restore the file is judged: unchanged, appended to (the bytes after the recorded size are
//! kept beside it as `FILE.stasis-after-ID` and the file is cut back), or changed (put back
//! from the copy, what it held kept as `FILE.stasis-changed-ID`, or the restore is refused).
//!
//! Content decides, not the inode: a file put back after a reboot, or replaced by a copy with
//! the same bytes, is the file the memory expects. Root writes only to a single-link regular
//! file owned as recorded, reached without following any symbolic link.

use super::manifest::WrittenFile;
use super::safe_open::plain_path;
use super::safe_open::{open_no_symlinks, open_proc_handle, UnsafeFile};
use super::tree_files::TreeFd;
use super::StoreError;
use crate::config::OnFileChanged;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Copies are named `images/stasis-written.N`: flat, and never a name CRIU uses.
pub const IMAGE_PREFIX: &str = "stasis-written.";
/// A file up to this size is copied into the checkpoint; a bigger one only hashed.
pub const COPY_CAP: u64 = 1 << 20;
/// All copies of one checkpoint together.
pub const COPIES_CAP: u64 = 16 << 20;
/// A file over this size is not hashed (the freeze would grow with it): only its size is kept.
pub const HASH_CAP: u64 = 256 << 20;
/// Bytes hashed for one checkpoint, over every file.
pub const HASHED_CAP: u64 = 1 << 30;
const PIECE: usize = 1 << 20;

/// A path an open file of the tree may be recorded by: a plain path, not under /proc, /sys or
/// /dev (the kernel's; /dev/shm is store::shm's), and not a deleted file (CRIU keeps those).
fn candidate(target: &Path) -> bool {
    plain_path(target)
        && !["/proc", "/sys", "/dev"].iter().any(|p| target.starts_with(p))
        && !target.as_os_str().as_encoded_bytes().ends_with(b" (deleted)")
}

#[derive(Debug, thiserror::Error)]
pub enum WrittenError {
    #[error(transparent)]
    Unsafe(#[from] UnsafeFile),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("failed to read {path}: it ended at {got} bytes while {want} were expected (it changed while it was read); try again")]
    Short { path: PathBuf, want: u64, got: u64 },
    #[error("failed to restore over {path}: {detail}, and no copy was kept at the checkpoint (it was over {cap} bytes); the memory in the checkpoint expects the file as it was then ({size} bytes): put that file back and start again, or delete the checkpoint to start cold", cap = COPY_CAP)]
    Changed { path: PathBuf, detail: String, size: u64 },
    #[error("failed to restore over {path}: {detail}, and `on_file_changed: refuse` is set in {service_file}; the checkpoint is kept: put the file back as it was ({size} bytes), or set `on_file_changed: restore` to keep what was added beside it")]
    Policy { path: PathBuf, detail: String, size: u64, service_file: PathBuf },
    #[error("failed to restore over {path}: it grew from {size} to {now} bytes and it was over {cap} bytes at the checkpoint, so its content was not hashed and an append cannot be told from a rewrite; cut it back to {size} bytes if only lines were added, then start again", cap = HASH_CAP)]
    Unhashed { path: PathBuf, size: u64, now: u64 },
    #[error("failed to restore over {path}: {why}; root does not write to it; put the file the service wrote back in its place")]
    NotTheFile { path: PathBuf, why: String },
    #[error("failed to {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("failed to use the checkpoint's copy of {path}: {why}; the checkpoint is damaged")]
    BadCopy { path: PathBuf, why: String },
}

impl WrittenError {
    /// The file is not as the memory expects and stasis may not fix it: the restore is refused
    /// (the checkpoint is kept); otherwise the host failed a step (reading, writing).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            WrittenError::Changed { .. }
                | WrittenError::Policy { .. }
                | WrittenError::Unhashed { .. }
                | WrittenError::NotTheFile { .. }
                | WrittenError::BadCopy { .. }
        )
    }
}

/// Hashes the first `size` bytes of `file` (feeding each piece to `also`), by `deadline`.
/// Err(Short) when the file ends sooner.
fn hash_prefix(
    file: &File,
    label: &Path,
    size: u64,
    deadline: Option<Instant>,
    mut also: impl FnMut(&[u8], u64) -> Result<(), WrittenError>,
) -> Result<String, WrittenError> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; PIECE];
    let mut at = 0u64;
    while at < size {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(UnsafeFile::Deadline { path: label.to_path_buf() }.into());
        }
        let want = ((size - at) as usize).min(PIECE);
        let n = file
            .read_at(&mut buf[..want], at)
            .map_err(|source| UnsafeFile::Read { path: label.to_path_buf(), source })?;
        if n == 0 {
            return Err(WrittenError::Short { path: label.to_path_buf(), want: size, got: at });
        }
        h.update(&buf[..n]);
        also(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Records every regular file the frozen tree holds open for writing (each file once), through
/// the process's own descriptor; small ones are copied into `images`. Files over the caps keep
/// only their size; every read ends by `deadline`.
pub fn capture(
    fds: &[TreeFd],
    images: &Path,
    min_free: u64,
    deadline: Option<Instant>,
) -> Result<Vec<WrittenFile>, WrittenError> {
    let mut kept: Vec<WrittenFile> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let (mut copied, mut hashed) = (0u64, 0u64);
    for fd in fds.iter().filter(|f| f.writes() && candidate(&f.target)) {
        // Not a regular file (a pipe, a socket, a device): CRIU's alone.
        let Ok((file, meta)) = open_proc_handle(&fd.handle(), &fd.target) else { continue };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let size = meta.len();
        let copy = (size <= COPY_CAP && copied + size <= COPIES_CAP).then(|| format!("{IMAGE_PREFIX}{}", kept.len()));
        let hash = if copy.is_some() || (size <= HASH_CAP && hashed + size <= HASHED_CAP) {
            hashed += size;
            Some(hash_and_copy(&file, &fd.target, size, images, copy.as_deref(), min_free, deadline)?)
        } else {
            tracing::info!("{} is over the hashing cap: only its size is recorded", fd.target.display());
            None
        };
        if copy.is_some() {
            copied += size;
        }
        kept.push(WrittenFile {
            path: fd.target.clone(),
            size,
            hash,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            copy,
        });
    }
    Ok(kept)
}

fn hash_and_copy(
    file: &File,
    label: &Path,
    size: u64,
    images: &Path,
    copy: Option<&str>,
    min_free: u64,
    deadline: Option<Instant>,
) -> Result<String, WrittenError> {
    let out = match copy {
        Some(name) => {
            super::shm::room_for(images, label, size, min_free)?;
            let to = images.join(name);
            let out = File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&to)
                .map_err(|source| StoreError::Create { path: to.clone(), source })?;
            Some((out, to))
        }
        None => None,
    };
    hash_prefix(file, label, size, deadline, |piece, at| match &out {
        Some((o, to)) => {
            o.write_all_at(piece, at).map_err(|source| StoreError::Write { path: to.clone(), source }.into())
        }
        None => Ok(()),
    })
}

/// What a file is now, against what the memory expects.
enum Found {
    Same,
    /// Bytes were added after the recorded size (it is `now` bytes long).
    Appended {
        file: File,
        now: u64,
    },
    /// The recorded bytes are not all there as they were; None when the file is missing.
    Changed {
        file: Option<File>,
        detail: String,
    },
}

/// Judges every file before any is touched, then brings each back to what the memory of
/// checkpoint `id` expects (or refuses, touching nothing). Returns a line for each file it
/// changed, for the log and `start`.
pub fn reconcile(
    files: &[WrittenFile],
    images: &Path,
    id: &str,
    policy: OnFileChanged,
    service_file: &Path,
    deadline: Option<Instant>,
) -> Result<Vec<String>, WrittenError> {
    let mut plan = Vec::new();
    for f in files {
        if !plain_path(&f.path) {
            return Err(WrittenError::BadCopy {
                path: f.path.clone(),
                why: "its recorded path is not a plain path".into(),
            });
        }
        let found = judge(f, deadline)?;
        let detail = match &found {
            Found::Same => continue,
            Found::Appended { now, .. } => format!("{} bytes were added after the {} it had", now - f.size, f.size),
            Found::Changed { detail, .. } => detail.clone(),
        };
        if policy == OnFileChanged::Refuse {
            let service_file = service_file.to_path_buf();
            return Err(WrittenError::Policy { path: f.path.clone(), detail, size: f.size, service_file });
        }
        if matches!(found, Found::Changed { .. }) && f.copy.is_none() {
            return Err(WrittenError::Changed { path: f.path.clone(), detail, size: f.size });
        }
        plan.push((f, found));
    }
    let mut notes = Vec::new();
    for (f, found) in plan {
        notes.push(match found {
            Found::Same => continue,
            Found::Appended { file, now } => {
                let kept = keep_beside(f, &file, f.size, now, &format!("stasis-after-{id}"))?;
                cut_to(&file, &f.path, f.size)?;
                format!(
                    "{} had {} bytes added after checkpoint {id}; cut back to its {} bytes at the checkpoint, the added bytes kept in {}",
                    f.path.display(),
                    now - f.size,
                    f.size,
                    kept.display()
                )
            }
            Found::Changed { file, detail } => put_back(f, file, images, id, &detail)?,
        });
    }
    Ok(notes)
}

fn judge(f: &WrittenFile, deadline: Option<Instant>) -> Result<Found, WrittenError> {
    let (file, meta) = match open_no_symlinks(&f.path) {
        Ok(opened) => opened,
        Err(e) if e.not_found() => return Ok(Found::Changed { file: None, detail: "it is missing".into() }),
        Err(e @ (UnsafeFile::Symlink { .. } | UnsafeFile::NotRegular { .. })) => {
            return Err(WrittenError::NotTheFile { path: f.path.clone(), why: e.to_string() })
        }
        Err(e) => return Err(e.into()),
    };
    let now = meta.len();
    let found = if now < f.size {
        Found::Changed { file: Some(file), detail: format!("it shrank from {} to {now} bytes", f.size) }
    } else {
        let Some(recorded) = &f.hash else {
            return match now == f.size {
                true => Ok(Found::Same),
                false => Err(WrittenError::Unhashed { path: f.path.clone(), size: f.size, now }),
            };
        };
        if &hash_prefix(&file, &f.path, f.size, deadline, |_, _| Ok(()))? != recorded {
            Found::Changed { file: Some(file), detail: format!("its first {} bytes changed", f.size) }
        } else if now > f.size {
            Found::Appended { file, now }
        } else {
            Found::Same
        }
    };
    if !matches!(found, Found::Same) && (meta.nlink() != 1 || meta.uid() != f.uid) {
        return Err(WrittenError::NotTheFile {
            path: f.path.clone(),
            why: format!(
                "it changed, and it now has {} links and owner uid {} (recorded: one link, uid {})",
                meta.nlink(),
                meta.uid(),
                f.uid
            ),
        });
    }
    Ok(found)
}

/// Copies bytes [from, to) of `file` into a new file beside it named `NAME.SUFFIX` (or
/// `NAME.SUFFIX.2`, ...: never over an existing file), owned and moded as recorded, durable.
fn keep_beside(f: &WrittenFile, file: &File, from: u64, to: u64, suffix: &str) -> Result<PathBuf, WrittenError> {
    let (dir_path, name) = (f.path.parent().unwrap_or(Path::new("/")), f.path.file_name().unwrap_or_default());
    let dir = super::safe_open::open_dir(dir_path).map_err(|source| WrittenError::Io {
        action: "open the directory of",
        path: f.path.clone(),
        source,
    })?;
    let (out, path) = (1..100)
        .map(|n| {
            let mut beside = name.to_os_string();
            beside.push(if n == 1 { format!(".{suffix}") } else { format!(".{suffix}.{n}") });
            (super::safe_open::create_in(&dir, &beside), dir_path.join(beside))
        })
        .find(|(r, _)| !matches!(r, Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists))
        .ok_or_else(|| WrittenError::Io {
            action: "find a free name beside",
            path: f.path.clone(),
            source: std::io::ErrorKind::AlreadyExists.into(),
        })?;
    let out = out.map_err(|source| WrittenError::Io { action: "create", path: path.clone(), source })?;
    let io = |source| WrittenError::Io { action: "write", path: path.clone(), source };
    std::os::unix::fs::fchown(&out, Some(f.uid), Some(f.gid)).map_err(io)?;
    out.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(f.mode & 0o777)).map_err(io)?;
    let mut buf = vec![0u8; PIECE];
    let mut at = from;
    while at < to {
        let want = ((to - at) as usize).min(PIECE);
        let n = file.read_at(&mut buf[..want], at).map_err(io)?;
        if n == 0 {
            break;
        }
        out.write_all_at(&buf[..n], at - from).map_err(io)?;
        at += n as u64;
    }
    // The bytes must be safe beside it before the file loses them.
    out.sync_all().map_err(io)?;
    Ok(path)
}

/// The same open file, for writing: reopened through this process's own descriptor (a magic
/// link to that very file, so not O_NOFOLLOW), so no path is walked again.
fn writable(file: &File, path: &Path) -> Result<File, WrittenError> {
    File::options()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|source| WrittenError::Io { action: "open for writing", path: path.to_path_buf(), source })
}

fn cut_to(file: &File, path: &Path, size: u64) -> Result<(), WrittenError> {
    let w = writable(file, path)?;
    let io = |source| WrittenError::Io { action: "cut back", path: path.to_path_buf(), source };
    w.set_len(size).map_err(io)?;
    w.sync_all().map_err(io)
}

/// Puts the checkpoint's copy of `f` in place: into the file when it is there (what it held is
/// kept beside it first), else as a new file.
fn put_back(
    f: &WrittenFile,
    file: Option<File>,
    images: &Path,
    id: &str,
    detail: &str,
) -> Result<String, WrittenError> {
    let name = f.copy.as_deref().unwrap_or_default();
    if !name.starts_with(IMAGE_PREFIX) || name.contains('/') {
        return Err(WrittenError::BadCopy {
            path: f.path.clone(),
            why: format!("its copy's name {name:?} is not one"),
        });
    }
    let from = images.join(name);
    let (copy, meta) = open_no_symlinks(&from)?;
    if meta.len() != f.size {
        return Err(WrittenError::BadCopy {
            path: f.path.clone(),
            why: format!("{} is not {} bytes", from.display(), f.size),
        });
    }
    let (out, kept) = match file {
        Some(file) => {
            let now = file.metadata().map(|m| m.len()).unwrap_or(0);
            let kept = keep_beside(f, &file, 0, now, &format!("stasis-changed-{id}"))?;
            let out = writable(&file, &f.path)?;
            out.set_len(0).map_err(|source| WrittenError::Io { action: "rewrite", path: f.path.clone(), source })?;
            (out, Some(kept))
        }
        None => {
            let dir = super::safe_open::open_dir(f.path.parent().unwrap_or(Path::new("/")))
                .map_err(|source| WrittenError::Io { action: "open the directory of", path: f.path.clone(), source })?;
            let out = super::safe_open::create_in(&dir, f.path.file_name().unwrap_or_default())
                .map_err(|source| WrittenError::Io { action: "create", path: f.path.clone(), source })?;
            let io = |source| WrittenError::Io { action: "create", path: f.path.clone(), source };
            std::os::unix::fs::fchown(&out, Some(f.uid), Some(f.gid)).map_err(io)?;
            out.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(f.mode & 0o777)).map_err(io)?;
            (out, None)
        }
    };
    let io = |source| WrittenError::Io { action: "write", path: f.path.clone(), source };
    hash_prefix(&copy, &from, f.size, None, |piece, at| out.write_all_at(piece, at).map_err(io))?;
    out.sync_all().map_err(io)?;
    Ok(match kept {
        Some(k) => format!(
            "{}: {detail} since checkpoint {id}; put back from the copy kept with it, what it held kept in {}",
            f.path.display(),
            k.display()
        ),
        None => format!("{} was missing; put back from the copy kept with checkpoint {id}", f.path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &Path, copy: Option<&str>, images: &Path) -> WrittenFile {
        let bytes = std::fs::read(path).unwrap();
        if let Some(c) = copy {
            std::fs::write(images.join(c), &bytes).unwrap();
        }
        WrittenFile {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            hash: Some(blake3::hash(&bytes).to_hex().to_string()),
            mode: 0o640,
            uid: 0,
            gid: 0,
            copy: copy.map(str::to_string),
        }
    }

    #[test]
    fn an_append_is_cut_back_and_kept_beside_a_rewrite_is_put_back_or_refused() {
        let d = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let (log, big) = (d.path().join("out.log"), d.path().join("big"));
        std::fs::write(&log, b"1\n2\n").unwrap();
        std::fs::write(&big, b"abc").unwrap();
        let (rl, rb) = (record(&log, Some("stasis-written.0"), images.path()), record(&big, None, images.path()));
        let go = |files: &[WrittenFile], p| reconcile(files, images.path(), "ID", p, Path::new("/s.yaml"), None);
        assert!(go(&[rl.clone(), rb.clone()], OnFileChanged::Restore).unwrap().is_empty(), "unchanged");
        std::fs::write(&log, b"1\n2\n3\n").unwrap();
        assert!(matches!(go(&[rl.clone()], OnFileChanged::Refuse), Err(WrittenError::Policy { .. })));
        assert_eq!(std::fs::read(&log).unwrap(), b"1\n2\n3\n", "a refusal touches nothing");
        let notes = go(&[rl.clone()], OnFileChanged::Restore).unwrap();
        assert!(notes[0].contains("out.log.stasis-after-ID"), "{notes:?}");
        assert_eq!(std::fs::read(&log).unwrap(), b"1\n2\n");
        assert_eq!(std::fs::read(d.path().join("out.log.stasis-after-ID")).unwrap(), b"3\n");
        // Again: never over the file kept before.
        std::fs::write(&log, b"1\n2\n4\n").unwrap();
        go(&[rl.clone()], OnFileChanged::Restore).unwrap();
        assert_eq!(std::fs::read(d.path().join("out.log.stasis-after-ID")).unwrap(), b"3\n");
        assert_eq!(std::fs::read(d.path().join("out.log.stasis-after-ID.2")).unwrap(), b"4\n");
        // A changed prefix: back from the copy, what it held kept.
        std::fs::write(&log, b"X\n2\n").unwrap();
        go(&[rl.clone()], OnFileChanged::Restore).unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"1\n2\n");
        assert_eq!(std::fs::read(d.path().join("out.log.stasis-changed-ID")).unwrap(), b"X\n2\n");
        std::fs::remove_file(&log).unwrap();
        go(&[rl.clone()], OnFileChanged::Restore).unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"1\n2\n", "a missing file is put back");
        // Without a copy: refused, untouched.
        std::fs::write(&big, b"abd").unwrap();
        assert!(matches!(go(&[rl.clone(), rb.clone()], OnFileChanged::Restore), Err(WrittenError::Changed { .. })));
        std::fs::write(&big, b"ab").unwrap();
        let e = go(&[rb.clone()], OnFileChanged::Restore).unwrap_err();
        assert!(e.to_string().contains("shrank"), "{e}");
        // A symlink in its place is never followed, a hard link never written through.
        std::fs::remove_file(&big).unwrap();
        std::os::unix::fs::symlink(&log, &big).unwrap();
        assert!(matches!(go(&[rb.clone()], OnFileChanged::Restore), Err(WrittenError::NotTheFile { .. })));
        std::fs::remove_file(&log).unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"1\n2\nprecious").unwrap();
        std::fs::hard_link(&victim, &log).unwrap();
        assert!(matches!(go(&[rl], OnFileChanged::Restore), Err(WrittenError::NotTheFile { .. })));
        assert_eq!(std::fs::read(&victim).unwrap(), b"1\n2\nprecious");
    }

    #[test]
    fn only_plain_paths_outside_the_kernel_filesystems_are_candidates() {
        assert!(candidate(Path::new("/var/log/x.log")));
        for bad in ["/proc/1/fd/1", "/dev/null", "/sys/x", "rel/x", "/a/../b", "/a/b (deleted)", "/a\nb", "/"] {
            assert!(!candidate(Path::new(bad)), "{bad:?}");
        }
        let f = |flags| TreeFd { pid: 1, fd: 1, target: "/x".into(), flags }.writes();
        assert!(f(libc::O_WRONLY) && f(libc::O_RDWR) && f(libc::O_APPEND) && !f(libc::O_RDONLY));
    }
}
