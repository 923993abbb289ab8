//! What a reboot removes and a restore needs: the directories of the unix sockets the tree
//! binds (redis's `/run/redis` for `--unixsocket /run/redis/redis.sock`) and the small files it
//! holds open there. CRIU binds and reopens them by path, so after a reboot the restore failed.
//!
//! Which places count: everything under `/run` (`/var/run` is read as `/run`; the FHS has it
//! emptied at boot, whatever its filesystem), and any tmpfs other than `/dev` (store::shm keeps
//! /dev/shm). Each directory below `/run`, or below the tmpfs's mount point, down to the socket
//! or file is recorded with its owner and mode at the freeze; small files (up to 1 MiB each,
//! 16 MiB in all) are copied into `images/`, bigger ones named in the log and left to CRIU.
//! Before a restore, what is missing is recreated, parents first, with the recorded owner and
//! mode; what is there is left as the host has it. Every directory is entered `O_NOFOLLOW`, one
//! component at a time, and every file created `O_EXCL`: never through a symbolic link.

use super::manifest::{TmpfsDir, TmpfsFile};
use super::safe_open::{create_in, cstr, open_dir, open_in, plain_path};
use super::safe_open::{open_no_symlinks, open_proc_handle, read_bounded, UnsafeFile};
use super::tree_files::TreeFd;
use super::StoreError;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Copies are named `images/stasis-tmpfs.N`.
pub const IMAGE_PREFIX: &str = "stasis-tmpfs.";
pub const FILE_CAP: u64 = 1 << 20;
pub const FILES_CAP: u64 = 16 << 20;
const RUN: &str = "/run";
const TMPFS_MAGIC: i64 = 0x0102_1994;

#[derive(Debug, thiserror::Error)]
pub enum TmpfsError {
    #[error(transparent)]
    Unsafe(#[from] UnsafeFile),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("failed to recreate {path}: {what} is not a directory reached without symbolic links ({source}); remove what is in its place, then start again")]
    NotADirectory { path: PathBuf, what: PathBuf, source: std::io::Error },
    #[error("failed to recreate the directory {path}: {source}; create it (owner {uid}:{gid}, mode {mode:o}), then start again")]
    MakeDir { path: PathBuf, uid: u32, gid: u32, mode: u32, source: std::io::Error },
    #[error("failed to put back {path}: {source}")]
    PutFile { path: PathBuf, source: std::io::Error },
    #[error("failed to use the checkpoint's copy of {path}: {why}; the checkpoint is damaged")]
    BadRecord { path: PathBuf, why: String },
}

fn on_tmpfs(f: &File) -> bool {
    nix::sys::statfs::fstatfs(f).is_ok_and(|s| s.filesystem_type().0 as i64 == TMPFS_MAGIC)
}

/// `/var/run/...` is `/run/...` where /var/run links there (Debian's layout).
fn canonical_run(path: &Path) -> PathBuf {
    match path.strip_prefix("/var/run") {
        Ok(rest)
            if std::fs::read_link("/var/run").is_ok_and(|t| t == Path::new("/run") || t == Path::new("../run")) =>
        {
            Path::new(RUN).join(rest)
        }
        _ => path.to_path_buf(),
    }
}

/// The directories from below `/run` (or below the tmpfs's mount point) down to `dir`, as they
/// are now, when `dir` lies where a reboot empties; None otherwise, or when a symbolic link is
/// on the way.
fn dirs_down_to(dir: &Path) -> Option<Vec<TmpfsDir>> {
    if !(plain_path(dir) || dir == Path::new(RUN)) || dir.starts_with("/dev") {
        return None;
    }
    let mut walked: Vec<(PathBuf, std::fs::Metadata, bool)> = Vec::new();
    let mut cur = File::open("/").ok()?;
    let mut path = PathBuf::from("/");
    for part in dir.components().skip(1) {
        cur = open_in(&cur, part.as_os_str()).ok()?;
        path.push(part);
        walked.push((path.clone(), cur.metadata().ok()?, on_tmpfs(&cur)));
    }
    let below = if dir.starts_with(RUN) {
        1
    } else {
        // Below the mount point: the last directory whose parent is on another device.
        let (_, _, tmpfs) = walked.last()?;
        if !tmpfs {
            return None;
        }
        let root_dev = std::fs::metadata("/").ok()?.dev();
        (0..walked.len())
            .rev()
            .find(|&i| walked[i].1.dev() != if i == 0 { root_dev } else { walked[i - 1].1.dev() })
            .map(|i| i + 1)?
    };
    Some(
        walked[below..]
            .iter()
            .map(|(p, m, _)| TmpfsDir { path: p.clone(), mode: m.mode() & 0o7777, uid: m.uid(), gid: m.gid() })
            .collect(),
    )
}

/// The bound paths of the tree's unix sockets, from /proc/PID/net/unix of each network
/// namespace the tree uses. A path may hold a newline and so forge a line: an inode seen on
/// more than one line is ignored altogether.
fn socket_paths(fds: &[TreeFd]) -> Vec<PathBuf> {
    let inodes: std::collections::HashSet<u64> = fds
        .iter()
        .filter_map(|f| f.target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect();
    let mut namespaces = std::collections::HashSet::new();
    let mut lines: std::collections::HashMap<u64, Vec<PathBuf>> = Default::default();
    for fd in fds {
        let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/net", fd.pid)) else { continue };
        if !namespaces.insert(ns) {
            continue;
        }
        let Ok(text) = std::fs::read(format!("/proc/{}/net/unix", fd.pid)) else { continue };
        for line in text.split(|&b| b == b'\n').skip(1) {
            if let Some((inode, path)) = parse_unix_line(line) {
                lines.entry(inode).or_default().push(path);
            }
        }
    }
    let mut out: Vec<PathBuf> = lines
        .into_iter()
        .filter(|(inode, paths)| inodes.contains(inode) && paths.len() == 1)
        .map(|(_, mut p)| canonical_run(&p.remove(0)))
        .filter(|p| plain_path(p))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `Num RefCount Protocol Flags Type St Inode Path`: the inode and the path, when bound to one.
fn parse_unix_line(line: &[u8]) -> Option<(u64, PathBuf)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut rest = text;
    let mut inode = None;
    for i in 0..7 {
        rest = rest.trim_start_matches(' ');
        let end = rest.find(' ').unwrap_or(rest.len());
        if i == 6 {
            inode = rest[..end].parse().ok();
        }
        rest = &rest[end..];
    }
    let path = rest.strip_prefix(' ')?;
    // '@' starts an abstract name: no file, no directory.
    let inode = inode?;
    (!path.is_empty() && path.starts_with('/')).then(|| (inode, PathBuf::from(path)))
}

/// Records the directories of the unix sockets the frozen tree bound and of the small files it
/// holds open there, and copies those files into `images` (see the module's text).
pub fn capture(
    fds: &[TreeFd],
    images: &Path,
    min_free: u64,
    deadline: Option<Instant>,
) -> Result<(Vec<TmpfsDir>, Vec<TmpfsFile>), TmpfsError> {
    let mut dirs: Vec<TmpfsDir> = Vec::new();
    let mut add = |found: Vec<TmpfsDir>| {
        for d in found {
            if !dirs.iter().any(|k| k.path == d.path) {
                dirs.push(d);
            }
        }
    };
    for sock in socket_paths(fds) {
        if let Some(found) = sock.parent().and_then(dirs_down_to) {
            add(found);
        }
    }
    let mut files: Vec<TmpfsFile> = Vec::new();
    let mut total = 0u64;
    for fd in fds {
        let path = canonical_run(&fd.target);
        if !plain_path(&path) || files.iter().any(|f| f.path == path) {
            continue;
        }
        let Some(found) = path.parent().and_then(dirs_down_to) else { continue };
        let Ok((src, meta)) = open_proc_handle(&fd.handle(), &path) else { continue };
        // Only the file that is at that path, alone (a planted hard link names another file).
        let at_path = open_no_symlinks(&path).ok().map(|(_, m)| (m.dev(), m.ino()));
        if meta.nlink() != 1 || at_path != Some((meta.dev(), meta.ino())) {
            continue;
        }
        if meta.len() > FILE_CAP || total + meta.len() > FILES_CAP {
            tracing::warn!(
                "{} is {} bytes, over what a checkpoint copies ({FILE_CAP} each, {FILES_CAP} in all): left to CRIU; after a reboot it must be recreated before a restore",
                path.display(),
                meta.len()
            );
            continue;
        }
        super::shm::room_for(images, &path, meta.len(), min_free)?;
        let image = format!("{IMAGE_PREFIX}{}", files.len());
        copy_file(&src, &path, &images.join(&image), deadline)?;
        total += meta.len();
        add(found);
        let (mode, uid, gid, size) = (meta.mode() & 0o7777, meta.uid(), meta.gid(), meta.len());
        files.push(TmpfsFile { path, mode, uid, gid, size, image });
    }
    Ok((dirs, files))
}

fn copy_file(src: &File, label: &Path, to: &Path, deadline: Option<Instant>) -> Result<(), TmpfsError> {
    let mut out = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|source| StoreError::Create { path: to.to_path_buf(), source })?;
    let mut failed = None;
    read_bounded(src, label, FILE_CAP, deadline, 1 << 16, |piece| {
        if failed.is_none() {
            failed = std::io::Write::write_all(&mut out, piece).err();
        }
    })?;
    match failed {
        Some(source) => Err(StoreError::Write { path: to.to_path_buf(), source }.into()),
        None => Ok(()),
    }
}

/// Whether a recorded path is one this module may create: plain, and under /run or on a tmpfs
/// (its parent, as the host has it now).
fn may_create(path: &Path, parent: &File) -> bool {
    plain_path(path) && !path.starts_with("/dev") && (path.starts_with(RUN) || on_tmpfs(parent))
}

/// Recreates what is missing of `dirs` (parents first) and `files` (from their copies in
/// `images`), with the recorded owners and modes. Returns a line for each thing made.
pub fn put_back(dirs: &[TmpfsDir], files: &[TmpfsFile], images: &Path) -> Result<Vec<String>, TmpfsError> {
    let mut made = Vec::new();
    let mut dirs: Vec<&TmpfsDir> = dirs.iter().collect();
    dirs.sort_by_key(|d| d.path.components().count());
    for d in dirs {
        if let Some(line) = make_dir(d)? {
            made.push(line);
        }
    }
    for f in files {
        if let Some(line) = put_file(f, images)? {
            made.push(line);
        }
    }
    Ok(made)
}

fn parent_of<'a>(path: &'a Path, bad: &dyn Fn(String) -> TmpfsError) -> Result<(&'a Path, &'a OsStr), TmpfsError> {
    match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) if plain_path(path) => Ok((p, n)),
        _ => Err(bad("it is not a plain path".into())),
    }
}

fn make_dir(d: &TmpfsDir) -> Result<Option<String>, TmpfsError> {
    let (parent_path, name) = parent_of(&d.path, &|why| TmpfsError::BadRecord { path: d.path.clone(), why })?;
    let not_dir = |what: &Path, source| TmpfsError::NotADirectory { path: d.path.clone(), what: what.into(), source };
    let parent = open_dir(parent_path).map_err(|e| not_dir(parent_path, e))?;
    match open_in(&parent, name) {
        Ok(_) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(not_dir(&d.path, e)),
    }
    if !may_create(&d.path, &parent) {
        return Ok(None);
    }
    let make_err = |source| TmpfsError::MakeDir { path: d.path.clone(), uid: d.uid, gid: d.gid, mode: d.mode, source };
    let c = cstr(name).map_err(make_err)?;
    // SAFETY: a NUL-terminated name relative to a directory fd we own.
    if unsafe { libc::mkdirat(parent.as_raw_fd(), c.as_ptr(), 0o700) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(make_err(e));
        }
        // Made meanwhile by someone else: theirs stands.
        return Ok(None);
    }
    let made = open_in(&parent, name).map_err(make_err)?;
    std::os::unix::fs::fchown(&made, Some(d.uid), Some(d.gid)).map_err(make_err)?;
    made.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(d.mode)).map_err(make_err)?;
    Ok(Some(format!(
        "{} was missing (a reboot empties it); recreated it (owner {}:{}, mode {:o}) as it was at the checkpoint",
        d.path.display(),
        d.uid,
        d.gid,
        d.mode
    )))
}

fn put_file(f: &TmpfsFile, images: &Path) -> Result<Option<String>, TmpfsError> {
    let bad = |why: String| TmpfsError::BadRecord { path: f.path.clone(), why };
    let (parent_path, name) = parent_of(&f.path, &bad)?;
    if !f.image.starts_with(IMAGE_PREFIX) || f.image.contains('/') {
        return Err(bad(format!("its copy's name {:?} is not one", f.image)));
    }
    let not_dir = |source| TmpfsError::NotADirectory { path: f.path.clone(), what: parent_path.into(), source };
    let parent = match open_dir(parent_path) {
        Ok(p) => p,
        // Not recreated (not where this module creates): CRIU says what is missing.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(not_dir(e)),
    };
    if !may_create(&f.path, &parent) {
        return Ok(None);
    }
    let put_err = |source| TmpfsError::PutFile { path: f.path.clone(), source };
    let out = match create_in(&parent, name) {
        Ok(out) => out,
        // There: the host's file stands (store::written judges the ones the service writes).
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => return Err(put_err(e)),
    };
    let from = images.join(&f.image);
    let filled = open_no_symlinks(&from).map_err(TmpfsError::from).and_then(|(src, meta)| {
        if meta.len() != f.size {
            return Err(bad(format!("{} is not {} bytes", from.display(), f.size)));
        }
        let mut w = &out;
        std::io::copy(&mut &src, &mut w).map_err(put_err)?;
        std::os::unix::fs::fchown(&out, Some(f.uid), Some(f.gid)).map_err(put_err)?;
        out.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(f.mode)).map_err(put_err)
    });
    if let Err(e) = filled {
        let _ = nix::unistd::unlinkat(&parent, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
        return Err(e);
    }
    Ok(Some(format!("{} was missing (a reboot empties it); put back from the checkpoint", f.path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_lines_give_bound_paths_only() {
        let l = b"0000000000000000: 00000002 00000000 00010000 0001 01 123456 /run/redis/redis.sock";
        assert_eq!(parse_unix_line(l), Some((123456, PathBuf::from("/run/redis/redis.sock"))));
        let l = b"0000000000000000: 00000002 00000000 00010000 0001 01  1234 /run/a b";
        assert_eq!(parse_unix_line(l), Some((1234, PathBuf::from("/run/a b"))));
        assert_eq!(parse_unix_line(b"0000000000000000: 00000002 00000000 00010000 0001 01 77 @abstract"), None);
        assert_eq!(parse_unix_line(b"0000000000000000: 00000002 00000000 00000000 0001 03 77"), None);
    }

    #[test]
    fn missing_directories_and_files_are_recreated_never_through_a_link() {
        let base = PathBuf::from(format!("/run/stasis-unit-{}", std::process::id()));
        struct Gone(PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _gone = Gone(base.clone());
        let images = tempfile::tempdir().unwrap();
        std::fs::write(images.path().join("stasis-tmpfs.0"), b"pid 7\n").unwrap();
        let dirs = vec![
            TmpfsDir { path: base.join("a"), mode: 0o750, uid: 65534, gid: 65534 },
            TmpfsDir { path: base.clone(), mode: 0o755, uid: 0, gid: 0 },
        ];
        let file = TmpfsFile {
            path: base.join("a/x.pid"),
            mode: 0o640,
            uid: 65534,
            gid: 0,
            size: 6,
            image: "stasis-tmpfs.0".into(),
        };
        let made = put_back(&dirs, std::slice::from_ref(&file), images.path()).unwrap();
        assert_eq!(made.len(), 3, "{made:?}");
        let m = std::fs::metadata(base.join("a")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid()), (0o750, 65534));
        assert_eq!(std::fs::read(&file.path).unwrap(), b"pid 7\n");
        assert_eq!(std::fs::metadata(&file.path).unwrap().mode() & 0o7777, 0o640);
        assert!(put_back(&dirs, std::slice::from_ref(&file), images.path()).unwrap().is_empty(), "all there");
        assert_eq!(dirs_down_to(&base.join("a")).unwrap(), {
            let mut d = dirs.clone();
            d.reverse();
            d
        });
        // A symbolic link in place of a directory: refused, nothing made behind it.
        std::fs::remove_dir_all(base.join("a")).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), base.join("a")).unwrap();
        assert!(matches!(
            put_back(&dirs, std::slice::from_ref(&file), images.path()),
            Err(TmpfsError::NotADirectory { .. })
        ));
        assert!(std::fs::read_dir(elsewhere.path()).unwrap().next().is_none());
        assert!(dirs_down_to(&base.join("a")).is_none());
        assert!(dirs_down_to(Path::new("/var/lib")).is_none(), "not emptied at boot");
    }
}
