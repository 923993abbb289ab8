//! POSIX shared memory kept with a checkpoint. `shm_open` files live in /dev/shm, outside
//! everything CRIU writes: CRIU records only their paths and reopens them at the restore, so a
//! reboot (which empties /dev/shm) made such a checkpoint unrestorable (PostgreSQL keeps its
//! dynamic shared memory there by default). The copy is taken while the tree is frozen, lives
//! in `images/` (so it is checksummed, sealed and exported like every image) and is put back
//! when the file is missing (after a reboot). A file still there is kept after a stopping
//! checkpoint (the tree died right after the copy) and rewound to the copy after one the tree
//! ran on from (periodic, on demand: its live contents are newer than the restored memory).

use super::manifest::ShmFile;
use super::safe_open::{open_proc_handle, UnsafeFile};
use super::tree_files::ShmHandle;
use super::StoreError;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const SHM_DIR: &str = "/dev/shm";

/// A name that is one plain entry of /dev/shm (the path comes from a service's /proc files).
fn plain_name(path: &Path) -> Option<String> {
    let name = path.strip_prefix(SHM_DIR).ok()?.to_str()?;
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.contains('/')
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| name.to_string())
}

/// Copies each regular file of /dev/shm the tree uses into `images`, reached through the
/// process's own handle (`/proc/PID/map_files/...`, `/proc/PID/fd/N`), never by its name:
/// whatever the service put at a name is not what root reads. Anything else (a FIFO, a link, a
/// directory, an odd name) is left alone, as before: CRIU decides. Copies keep their holes;
/// the data copied must leave `min_free` bytes free on the images' disk, and every copy ends by
/// `deadline`.
pub fn capture(
    handles: &[ShmHandle],
    images: &Path,
    min_free: u64,
    deadline: Option<Instant>,
) -> Result<Vec<ShmFile>, StoreError> {
    let mut kept: Vec<ShmFile> = Vec::new();
    let shm = shm_dev(Path::new(SHM_DIR));
    for h in handles {
        let Some(name) = plain_name(&h.path) else { continue };
        if kept.iter().any(|k| k.name == name) {
            continue;
        }
        let (src, meta) = match open_proc_handle(&h.handle, &h.path) {
            Ok(opened) => opened,
            Err(e) => {
                tracing::debug!("shm: left alone: {e}");
                continue;
            }
        };
        // A hard link planted in /dev/shm could name any file of the host: only a file that
        // lives there alone is the service's shared memory.
        let is_mapped = h.expect.is_none_or(|(dev, ino)| meta.dev() == dev && meta.ino() == ino);
        if !is_mapped || meta.nlink() != 1 || Some(meta.dev()) != shm {
            continue;
        }
        let needed =
            data_bytes(&src, meta.len()).map_err(|source| StoreError::Read { path: h.path.clone(), source })?;
        room_for(images, &h.path, needed, min_free)?;
        let file = ShmFile { name, mode: meta.mode() & 0o7777, uid: meta.uid(), gid: meta.gid(), size: meta.len() };
        let to = images.join(file.image_name());
        let out = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&to)
            .map_err(|source| StoreError::Create { path: to.clone(), source })?;
        copy_sparse(&src, &h.path, &out, &to, meta.len(), deadline)?;
        kept.push(file);
    }
    Ok(kept)
}

/// Bytes of data (not holes) in the regular files of /dev/shm the tree uses, as `capture` would
/// copy them: for the free-space estimate before a checkpoint.
pub fn data_bytes_of(handles: &[ShmHandle]) -> u64 {
    handles
        .iter()
        .filter_map(|h| open_proc_handle(&h.handle, &h.path).ok())
        .filter_map(|(file, meta)| data_bytes(&file, meta.len()).ok())
        .sum()
}

/// Bytes of `file` that are data, not holes (SEEK_DATA/SEEK_HOLE).
fn data_bytes(file: &File, len: u64) -> std::io::Result<u64> {
    let mut total = 0;
    let mut at = 0;
    while let Some((start, end)) = next_data(file, at, len)? {
        total += end - start;
        at = end;
    }
    Ok(total)
}

/// The next run of data at or after `at`, as [start, end), or None past the last one.
fn next_data(file: &File, at: u64, len: u64) -> std::io::Result<Option<(u64, u64)>> {
    if at >= len {
        return Ok(None);
    }
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a descriptor we own; the position is not shared with anyone reading it.
    let start = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some(((start as u64).min(len), (end as u64).min(len))).filter(|(s, e)| s < e))
}

/// Fails unless the disk of `dir` keeps `min_free` bytes free after `needed` more.
pub(crate) fn room_for(dir: &Path, path: &Path, needed: u64, min_free: u64) -> Result<(), StoreError> {
    let v = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| StoreError::FreeSpace { path: dir.to_path_buf(), source: e.into() })?;
    let free = v.blocks_available().saturating_mul(v.fragment_size());
    if free < needed.saturating_add(min_free) {
        return Err(StoreError::NoRoom { path: path.to_path_buf(), dir: dir.to_path_buf(), needed, free, min_free });
    }
    Ok(())
}

/// Copied at a time; each piece checks the deadline.
const PIECE: usize = 1 << 20;

/// Copies the data of `src` into `dst` at the same offsets and gives `dst` the length `len`:
/// holes stay holes, and so does a piece of data that is all zeros. Returns the bytes written.
fn copy_sparse(
    src: &File,
    from: &Path,
    dst: &File,
    to: &Path,
    len: u64,
    deadline: Option<Instant>,
) -> Result<u64, StoreError> {
    use std::os::unix::fs::FileExt;
    let read_err = |source| StoreError::Read { path: from.to_path_buf(), source };
    let write_err = |source| StoreError::Write { path: to.to_path_buf(), source };
    let mut buf = vec![0u8; PIECE];
    let mut written = 0;
    let mut at = 0;
    while let Some((start, end)) = next_data(src, at, len).map_err(read_err)? {
        let mut off = start;
        while off < end {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(UnsafeFile::Deadline { path: from.to_path_buf() }.into());
            }
            let want = ((end - off) as usize).min(PIECE);
            let n = src.read_at(&mut buf[..want], off).map_err(read_err)?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                dst.write_all_at(&buf[..n], off).map_err(write_err)?;
                written += n as u64;
            }
            off += n as u64;
        }
        at = end;
    }
    dst.set_len(len).map_err(write_err)?;
    Ok(written)
}

/// What a restore does with a file of /dev/shm that is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Present {
    /// Leave it: the tree was killed right after the copy (a stopping checkpoint), so the live
    /// file is at least as new as the memory being restored.
    Keep,
    /// Write the copy into it (same inode): the tree ran on after the copy (a periodic or
    /// on-demand checkpoint), so the live contents are newer than the memory being restored.
    Rewind,
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutBack {
    Created(PathBuf),
    Rewound(PathBuf),
}

/// Puts back every file of `files` missing from /dev/shm, from its verified copy in `images`,
/// with its owner and mode; a present one is kept or rewound as `present` says.
pub fn put_back(files: &[ShmFile], images: &Path, present: Present) -> Result<Vec<PutBack>, StoreError> {
    put_back_into(Path::new(SHM_DIR), files, images, present)
}

fn shm_dev(dir: &Path) -> Option<u64> {
    std::fs::metadata(dir).ok().map(|m| m.dev())
}

fn put_back_into(dir: &Path, files: &[ShmFile], images: &Path, present: Present) -> Result<Vec<PutBack>, StoreError> {
    let mut created = Vec::new();
    for f in files {
        // The manifest is checksummed, but a name is still checked before it becomes a path.
        let target = dir.join(&f.name);
        if plain_name(&Path::new(SHM_DIR).join(&f.name)).is_none() {
            return Err(StoreError::BadManifest {
                path: images.to_path_buf(),
                reason: format!("shm file name {:?} is not a plain name", f.name),
            });
        }
        let from = images.join(f.image_name());
        let src = File::open(&from).map_err(|source| StoreError::Read { path: from.clone(), source })?;
        if target.symlink_metadata().is_ok() {
            if present == Present::Rewind && rewind(&target, f, &src, &from, shm_dev(dir))? {
                created.push(PutBack::Rewound(target));
            }
            continue;
        }
        let out =
            match File::options().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&target)
            {
                Ok(out) => out,
                // Someone made it meanwhile: theirs is as live as it gets.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(StoreError::Create { path: target, source }),
            };
        let len = src.metadata().map_err(|source| StoreError::Read { path: from.clone(), source })?.len();
        let put = copy_sparse(&src, &from, &out, &target, len, None).and_then(|_| {
            std::os::unix::fs::fchown(&out, Some(f.uid), Some(f.gid))
                .and_then(|_| out.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(f.mode)))
                .map_err(|source| StoreError::Write { path: target.clone(), source })
        });
        if let Err(e) = put {
            let _ = std::fs::remove_file(&target);
            return Err(e);
        }
        created.push(PutBack::Created(target));
    }
    Ok(created)
}

/// Writes the copy into the live file, in place (processes that map it see the rewound
/// contents). Only a plain single-link file of /dev/shm owned as recorded is touched; anything
/// else (a planted link) is left for CRIU to judge. Returns whether it was rewound.
fn rewind(target: &Path, f: &ShmFile, src: &File, from: &Path, dev: Option<u64>) -> Result<bool, StoreError> {
    // Non-blocking: a FIFO planted at the name must not make the start wait for a reader.
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let Ok(out) = File::options().write(true).custom_flags(flags).open(target) else {
        return Ok(false);
    };
    let meta = out.metadata().map_err(|source| StoreError::Read { path: target.to_path_buf(), source })?;
    if !meta.is_file() || meta.nlink() != 1 || meta.uid() != f.uid || Some(meta.dev()) != dev {
        return Ok(false);
    }
    out.set_len(0).map_err(|source| StoreError::Write { path: target.to_path_buf(), source })?;
    let len = src.metadata().map_err(|source| StoreError::Read { path: from.to_path_buf(), source })?.len();
    copy_sparse(src, from, &out, target, len, None)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_entries_of_dev_shm_are_names() {
        assert_eq!(plain_name(Path::new("/dev/shm/PostgreSQL.123")).as_deref(), Some("PostgreSQL.123"));
        for bad in ["/dev/shm/a/b", "/dev/shm/..", "/dev/shm/", "/tmp/x", "/dev/shm/a b"] {
            assert_eq!(plain_name(Path::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn a_missing_file_is_put_back_with_its_bytes_and_a_present_one_is_left_alone() {
        let images = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir().unwrap();
        let gone = ShmFile { name: "seg".into(), mode: 0o640, uid: 0, gid: 0, size: 5 };
        let live = ShmFile { name: "live".into(), mode: 0o600, uid: 0, gid: 0, size: 3 };
        std::fs::write(images.path().join(gone.image_name()), b"saved").unwrap();
        std::fs::write(images.path().join(live.image_name()), b"old").unwrap();
        std::fs::write(shm.path().join("live"), b"new!").unwrap();
        let made = put_back_into(shm.path(), &[gone.clone(), live.clone()], images.path(), Present::Keep).unwrap();
        assert_eq!(made, vec![PutBack::Created(shm.path().join("seg"))]);
        assert_eq!(std::fs::read(shm.path().join("seg")).unwrap(), b"saved");
        assert_eq!(std::fs::metadata(shm.path().join("seg")).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(std::fs::read(shm.path().join("live")).unwrap(), b"new!", "the live file wins");
        // A checkpoint the tree ran on after: the live file is rewound to the copy, in place.
        let inode = std::fs::metadata(shm.path().join("live")).unwrap().ino();
        let made = put_back_into(shm.path(), &[live.clone()], images.path(), Present::Rewind).unwrap();
        assert_eq!(made, vec![PutBack::Rewound(shm.path().join("live"))]);
        assert_eq!(std::fs::read(shm.path().join("live")).unwrap(), b"old");
        assert_eq!(std::fs::metadata(shm.path().join("live")).unwrap().ino(), inode, "same inode");
        // A hard link planted under the name is never written through.
        let victim = shm.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::remove_file(shm.path().join("live")).unwrap();
        std::fs::hard_link(&victim, shm.path().join("live")).unwrap();
        assert!(put_back_into(shm.path(), &[live], images.path(), Present::Rewind).unwrap().is_empty());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let evil = ShmFile { name: "../etc/x".into(), mode: 0o600, uid: 0, gid: 0, size: 0 };
        assert!(put_back_into(shm.path(), &[evil], images.path(), Present::Keep).is_err());
    }

    #[test]
    fn copies_keep_their_holes_and_count_only_data() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let src_path = d.path().join("sparse");
        let src = File::create(&src_path).unwrap();
        src.set_len(96 << 20).unwrap();
        src.write_all_at(b"data", 40 << 20).unwrap();
        drop(src);
        let src = File::open(&src_path).unwrap();
        assert!(data_bytes(&src, 96 << 20).unwrap() <= 1 << 20, "a filesystem keeps at most a block or so");
        let to = d.path().join("copy");
        let out = File::create(&to).unwrap();
        let written = copy_sparse(&src, &src_path, &out, &to, 96 << 20, None).unwrap();
        assert!((4..=1 << 20).contains(&written), "only the data is written: {written}");
        let meta = std::fs::metadata(&to).unwrap();
        assert_eq!(meta.len(), 96 << 20);
        assert!(meta.blocks() * 512 <= 1 << 20, "the copy stays sparse: {} blocks", meta.blocks());
        let mut back = vec![0u8; 4];
        File::open(&to).unwrap().read_exact_at(&mut back, 40 << 20).unwrap();
        assert_eq!(&back, b"data");
        let past = Some(Instant::now());
        let out2 = File::create(d.path().join("late")).unwrap();
        assert!(matches!(
            copy_sparse(&src, &src_path, &out2, &d.path().join("late"), 96 << 20, past),
            Err(StoreError::Unsafe(UnsafeFile::Deadline { .. }))
        ));
        assert!(matches!(room_for(d.path(), &src_path, u64::MAX / 2, 0), Err(StoreError::NoRoom { .. })));
    }
}
