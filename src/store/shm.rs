//! POSIX shared memory kept with a checkpoint. `shm_open` files live in /dev/shm, outside
//! everything CRIU writes: CRIU records only their paths and reopens them at the restore, so a
//! reboot (which empties /dev/shm) made such a checkpoint unrestorable (PostgreSQL keeps its
//! dynamic shared memory there by default). The copy is taken while the tree is frozen, lives
//! in `images/` (so it is checksummed, sealed and exported like every image) and is put back
//! when the file is missing (after a reboot). A file still there is kept after a stopping
//! checkpoint (the tree died right after the copy) and rewound to the copy after one the tree
//! ran on from (periodic, on demand: its live contents are newer than the restored memory).

use super::manifest::ShmFile;
use super::StoreError;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const SHM_DIR: &str = "/dev/shm";
/// Copies are named `images/stasis-shm.NAME`: flat, and never a name CRIU uses.
pub const IMAGE_PREFIX: &str = "stasis-shm.";

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

/// Copies each regular file of /dev/shm in `paths` into `images`. Anything else under
/// /dev/shm (a link, a directory, an odd name) is left alone, as before: CRIU decides.
pub fn capture(paths: &[PathBuf], images: &Path) -> Result<Vec<ShmFile>, StoreError> {
    let mut kept: Vec<ShmFile> = Vec::new();
    for path in paths {
        let Some(name) = plain_name(path) else { continue };
        if kept.iter().any(|k| k.name == name) {
            continue;
        }
        let Ok(mut src) = File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(path) else { continue };
        let meta = src.metadata().map_err(|source| StoreError::Read { path: path.clone(), source })?;
        // A hard link planted in /dev/shm could name any file of the host: only a file that
        // lives there alone is the service's shared memory.
        if !meta.is_file() || meta.nlink() != 1 || Some(meta.dev()) != shm_dev(Path::new(SHM_DIR)) {
            continue;
        }
        let file = ShmFile { name, mode: meta.mode() & 0o7777, uid: meta.uid(), gid: meta.gid(), size: meta.len() };
        let to = images.join(file.image_name());
        let mut out = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&to)
            .map_err(|source| StoreError::Create { path: to.clone(), source })?;
        std::io::copy(&mut src, &mut out).map_err(|source| StoreError::Write { path: to.clone(), source })?;
        kept.push(file);
    }
    Ok(kept)
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
        let mut src = File::open(&from).map_err(|source| StoreError::Read { path: from.clone(), source })?;
        if target.symlink_metadata().is_ok() {
            if present == Present::Rewind && rewind(&target, f, &mut src, shm_dev(dir))? {
                created.push(PutBack::Rewound(target));
            }
            continue;
        }
        let mut out =
            match File::options().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&target)
            {
                Ok(out) => out,
                // Someone made it meanwhile: theirs is as live as it gets.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(StoreError::Create { path: target, source }),
            };
        let put = std::io::copy(&mut src, &mut out)
            .and_then(|_| std::os::unix::fs::fchown(&out, Some(f.uid), Some(f.gid)))
            .and_then(|_| out.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(f.mode)));
        if let Err(source) = put {
            let _ = std::fs::remove_file(&target);
            return Err(StoreError::Write { path: target, source });
        }
        created.push(PutBack::Created(target));
    }
    Ok(created)
}

/// Writes the copy into the live file, in place (processes that map it see the rewound
/// contents). Only a plain single-link file of /dev/shm owned as recorded is touched; anything
/// else (a planted link) is left for CRIU to judge. Returns whether it was rewound.
fn rewind(target: &Path, f: &ShmFile, src: &mut File, dev: Option<u64>) -> Result<bool, StoreError> {
    let Ok(mut out) = File::options().write(true).custom_flags(libc::O_NOFOLLOW).open(target) else {
        return Ok(false);
    };
    let meta = out.metadata().map_err(|source| StoreError::Read { path: target.to_path_buf(), source })?;
    if !meta.is_file() || meta.nlink() != 1 || meta.uid() != f.uid || Some(meta.dev()) != dev {
        return Ok(false);
    }
    out.set_len(0)
        .and_then(|_| std::io::copy(src, &mut out).map(|_| ()))
        .map_err(|source| StoreError::Write { path: target.to_path_buf(), source })?;
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
}
