//! The pass that makes a finished checkpoint durable: every file and directory under it
//! fsynced, and in the same pass every image hashed (with its chunk hashes, store::chunks)
//! unless it was hashed as it was written (store::stored). The commit protocol
//! (store::checkpoints) runs it just before the manifest is written.

use super::durable::fsync_dir;
use super::manifest::ImageFile;
use super::StoreError;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The result of [`fsync_and_hash`].
pub struct Synced {
    /// Total size of every file under the directory.
    pub total_bytes: u64,
    /// The files under the hashed subdirectory, sorted by path.
    pub hashed: Vec<ImageFile>,
}

/// fsyncs every regular file and directory under `dir` and, in the same pass, hashes every file
/// under `dir/hashed_subdir`: one thread reads and hashes (page cache, CPU) while this one waits
/// for the disk, so the checksums cost next to nothing on top of the fsyncs.
/// Each hash is of the file's bytes as read here, never taken from elsewhere on the strength
/// of a matching size.
/// Images in `known` were hashed as they were written (store::stored): they are fsynced, not
/// read again, once their size on disk is the size written (a file changed since is read).
pub fn fsync_and_hash(dir: &Path, hashed_subdir: &str, known: &[super::stored::Stored]) -> Result<Synced, StoreError> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    walk(dir, Path::new(""), &mut files, &mut dirs)?;
    // Chunk hashes already there (an import's) are written again below, with the hashes.
    files.retain(|(rel, _)| !rel.starts_with(&format!("{}/", super::chunks::DIR)));
    let to_hash: Vec<(String, PathBuf)> = files
        .iter()
        .filter(|(rel, _)| rel.starts_with(&format!("{hashed_subdir}/")))
        .map(|(rel, p)| (rel.clone(), p.clone()))
        .collect();
    std::thread::scope(|s| {
        // Each hash comes with the chunk hashes (CVs) it is made of, for the sidecars that let a
        // restore check the images as it reads them (store::chunks).
        type Hashed = (Vec<ImageFile>, Vec<(String, Vec<super::chunks::Cv>)>);
        let hasher = s.spawn(|| -> Result<Hashed, StoreError> {
            let mut out = Vec::with_capacity(to_hash.len());
            let mut cvs = Vec::new();
            for (rel, path) in &to_hash {
                if let Some(k) = known
                    .iter()
                    .find(|k| &k.file.path == rel && fs::metadata(path).is_ok_and(|m| m.len() == k.file.size))
                {
                    out.push(k.file.clone());
                    cvs.push((rel.clone(), k.cvs.clone()));
                    continue;
                }
                let (size, hash, chunks) =
                    super::chunks::hash_file(path).map_err(|source| StoreError::Read { path: path.clone(), source })?;
                out.push(ImageFile { path: rel.clone(), size, hash: hash.to_hex().to_string() });
                cvs.push((rel.clone(), chunks));
            }
            out.sort_by(|a, b| a.path.cmp(&b.path));
            Ok((out, cvs))
        });
        let mut total = 0;
        let mut open = Vec::with_capacity(files.len());
        for (_, path) in &files {
            let f = File::open(path).map_err(|source| StoreError::Read { path: path.clone(), source })?;
            // Writeback of every file starts now, so the disk works on all of them at once
            // instead of one fsync after another; the fsyncs below then mostly wait.
            // SAFETY: a valid fd; the call only starts writeback and touches no memory.
            unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
            open.push((f, path));
        }
        for (f, path) in &open {
            f.sync_all().map_err(|source| StoreError::Sync { path: path.to_path_buf(), source })?;
            total += f.metadata().map(|m| m.len()).unwrap_or(0);
        }
        // Children before parents, so each directory entry names durable content.
        for d in dirs.iter().rev() {
            fsync_dir(d)?;
        }
        let (hashed, cvs) = hasher.join().expect("the hashing thread does not panic")?;
        total += super::chunks::write_sidecars(dir, &cvs)?;
        Ok(Synced { total_bytes: total, hashed })
    })
}

/// Every regular file (with its path relative to the root) and directory under `dir`.
fn walk(dir: &Path, rel: &Path, files: &mut Vec<(String, PathBuf)>, dirs: &mut Vec<PathBuf>) -> Result<(), StoreError> {
    dirs.push(dir.to_path_buf());
    let entries = fs::read_dir(dir).map_err(|source| StoreError::Read { path: dir.to_path_buf(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| StoreError::Read { path: dir.to_path_buf(), source })?;
        let path = entry.path();
        let ft = entry.file_type().map_err(|source| StoreError::Read { path: path.clone(), source })?;
        let child = rel.join(entry.file_name());
        if ft.is_dir() {
            walk(&path, &child, files, dirs)?;
        } else if ft.is_file() {
            files.push((child.to_string_lossy().into_owned(), path));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_and_hash_sums_every_file_and_hashes_the_images() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("images")).unwrap();
        fs::write(d.path().join("images/a.img"), [0u8; 100]).unwrap();
        fs::write(d.path().join("b"), [0u8; 23]).unwrap();
        let s = fsync_and_hash(d.path(), "images", &[]).unwrap();
        assert_eq!(s.total_bytes, 123);
        assert_eq!(s.hashed.len(), 1);
        assert_eq!(s.hashed[0].path, "images/a.img");
        assert_eq!(s.hashed[0].hash, blake3::hash(&[0u8; 100]).to_hex().to_string());
    }

    #[test]
    fn fsync_and_hash_writes_the_chunk_hashes_of_large_images() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("images")).unwrap();
        let big: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 253) as u8).collect();
        fs::write(d.path().join("images/pages-1.img"), &big).unwrap();
        fs::write(d.path().join("images/core-1.img"), [1u8; 10]).unwrap();
        let s = fsync_and_hash(d.path(), "images", &[]).unwrap();
        let pages = s.hashed.iter().find(|f| f.path == "images/pages-1.img").unwrap();
        assert_eq!(pages.hash, blake3::hash(&big).to_hex().to_string());
        let (v, why) = super::super::chunks::verifier(d.path(), pages).unwrap();
        assert_eq!(why, None, "the sidecar is there and adds up");
        assert_eq!(v.groups(), 4);
        assert!(!d.path().join("chunks/core-1.img.cv").exists(), "one group needs none");
        let sidecar = fs::metadata(d.path().join("chunks/pages-1.img.cv")).unwrap().len();
        assert_eq!(s.total_bytes, big.len() as u64 + 10 + sidecar);
        // Again (an import's sidecars are there already): counted once.
        assert_eq!(fsync_and_hash(d.path(), "images", &[]).unwrap().total_bytes, s.total_bytes);
    }
}
