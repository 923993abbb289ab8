//! File identities (path, size, mtime, device, inode, content hash) and the cache that keeps a
//! start from reading whole binaries each time: a content hash is reused only while the file's
//! (dev, inode, size, mtime, ctime) stay the same. ctime cannot be set from user space, so a file
//! rewritten in place with its mtime put back is still hashed again.

use super::durable::{create_dir_with_mode, write_atomic_with, Durability};
use super::manifest::FileIdentity;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::safe_open::{open_no_symlinks, read_bounded, UnsafeFile, MAX_EXECUTABLE_BYTES};

/// How long a command that checks a checkpoint against the disk (`inspect`, `import`) reads the
/// files it names before giving up on one: generous for any real binary, finite for anything else.
pub const CLI_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// Enough for every binary and library of a host's services.
const MAX_ENTRIES: usize = 4096;

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    /// key -> (hash, last use as a sequence number)
    entries: BTreeMap<String, (String, u64)>,
    seq: u64,
}

pub struct HashCache {
    path: PathBuf,
    file: CacheFile,
    dirty: bool,
}

fn key(m: &std::fs::Metadata) -> String {
    format!("{}:{}:{}:{}.{}:{}.{}", m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec())
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

/// BLAKE3 of a whole file, hex (root's own files: checkpoint images, the init copy).
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    hash_open(&file, path, u64::MAX, None).map_err(|e| match e {
        UnsafeFile::Read { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    })
}

/// BLAKE3 of an open file, hex, reading at most `cap` bytes before `deadline`. Read, not
/// mapped: a supervisor hashing a large binary must not hold all of it resident. A large file is
/// hashed on every CPU (BLAKE3's tree splits a chunk across threads): one core hashes about
/// 1 GiB/s, slower than the disk a checkpoint goes to.
pub fn hash_open(
    file: &std::fs::File,
    label: &Path,
    cap: u64,
    deadline: Option<Instant>,
) -> Result<String, UnsafeFile> {
    let mut h = blake3::Hasher::new();
    let len = file.metadata().map_err(|source| UnsafeFile::Stat { path: label.to_path_buf(), source })?.len();
    if len < PARALLEL_FROM {
        read_bounded(file, label, cap, deadline, SMALL_CHUNK, |b| {
            h.update(b);
        })?;
        return Ok(h.finalize().to_hex().to_string());
    }
    // A pool of its own, ended with the hash: no threads stay behind in an idle supervisor.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let pool = rayon_core::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| UnsafeFile::Read { path: label.to_path_buf(), source: std::io::Error::other(e) })?;
    read_bounded(file, label, cap, deadline, PARALLEL_CHUNK, |b| {
        pool.install(|| h.update_rayon(b));
    })?;
    Ok(h.finalize().to_hex().to_string())
}

/// Read and hashed at a time below `PARALLEL_FROM`.
const SMALL_CHUNK: usize = 64 << 10;
/// Files from this size are hashed on several threads.
const PARALLEL_FROM: u64 = 8 << 20;
/// Read and hashed at a time; BLAKE3 splits each across the pool.
const PARALLEL_CHUNK: usize = 4 << 20;

impl HashCache {
    /// Loads the cache; a missing or damaged one is simply empty (it only saves work).
    pub fn load(path: PathBuf) -> HashCache {
        let file = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        HashCache { path, file, dirty: false }
    }

    /// A cache that is never written (for one-off checks).
    #[cfg(test)]
    pub fn in_memory() -> HashCache {
        HashCache { path: PathBuf::new(), file: CacheFile::default(), dirty: false }
    }

    /// The identity of `path` now, hashing its content unless the cache vouches for it. For
    /// root's own files (the init copy): symbolic links are followed, but only a regular file is
    /// read and a FIFO cannot make the open wait.
    pub fn identify(&mut self, path: &Path) -> std::io::Result<FileIdentity> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::File::options().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::other(format!("{} is not a regular file", path.display())));
        }
        self.identify_open(path, &file, &meta, None).map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// The identity of an open regular file known as `label`, hashed (unless the cache vouches
    /// for it) up to `MAX_EXECUTABLE_BYTES` and before `deadline`.
    pub fn identify_open(
        &mut self,
        label: &Path,
        file: &std::fs::File,
        before: &std::fs::Metadata,
        deadline: Option<Instant>,
    ) -> Result<FileIdentity, UnsafeFile> {
        if before.size() > MAX_EXECUTABLE_BYTES {
            return Err(UnsafeFile::TooLarge { path: label.to_path_buf(), cap: MAX_EXECUTABLE_BYTES });
        }
        let k = key(before);
        self.file.seq += 1;
        let seq = self.file.seq;
        let hash = match self.file.entries.get_mut(&k) {
            Some(entry) => {
                entry.1 = seq;
                entry.0.clone()
            }
            None => {
                let hash = hash_open(file, label, MAX_EXECUTABLE_BYTES, deadline)?;
                // A file that changed while it was read gets no cache entry.
                if file.metadata().map(|m| key(&m)).ok().as_deref() == Some(k.as_str()) {
                    self.file.entries.insert(k, (hash.clone(), seq));
                }
                hash
            }
        };
        self.dirty = true;
        Ok(FileIdentity {
            path: label.to_path_buf(),
            size: before.size(),
            mtime_ns: mtime_ns(before),
            dev: before.dev(),
            inode: before.ino(),
            hash,
        })
    }

    /// Writes the cache back (best effort: a lost cache only costs hashing again).
    pub fn save(&mut self) {
        if !self.dirty || self.path.as_os_str().is_empty() {
            return;
        }
        if self.file.entries.len() > MAX_ENTRIES {
            let mut by_use: Vec<(u64, String)> = self.file.entries.iter().map(|(k, v)| (v.1, k.clone())).collect();
            by_use.sort();
            for (_, k) in by_use.iter().take(self.file.entries.len() - MAX_ENTRIES) {
                self.file.entries.remove(k);
            }
        }
        if let Some(dir) = self.path.parent() {
            let _ = create_dir_with_mode(dir, 0o700);
        }
        let bytes = serde_json::to_vec(&self.file).expect("cache serializes");
        // A cache: whatever a crash leaves of it is re-hashed.
        if write_atomic_with(&self.path, &bytes, Durability::None).is_ok() {
            self.dirty = false;
        }
    }
}

/// Why a checkpoint does not fit the files on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub path: PathBuf,
    pub detail: String,
}

/// Compares the recorded identities with the files now on disk. Same content is a match even on
/// a new inode (a reinstall of the same build); different content of the same size is not.
/// The paths come from a manifest and may be the service's own files: each is opened without
/// following symbolic links and read only if it is a regular file, within `deadline`; anything
/// else fails closed as a mismatch naming the path.
pub fn compare(recorded: &[FileIdentity], cache: &mut HashCache, deadline: Option<Instant>) -> Result<(), Mismatch> {
    for r in recorded {
        let now = open_no_symlinks(&r.path)
            .and_then(|(file, meta)| cache.identify_open(&r.path, &file, &meta, deadline))
            .map_err(|e| Mismatch {
                path: r.path.clone(),
                detail: if e.not_found() {
                    "it no longer exists".to_string()
                } else {
                    format!("it cannot be checked safely: {e}")
                },
            })?;
        if now.hash != r.hash {
            let size = if now.size == r.size {
                format!("same size {}", r.size)
            } else {
                format!("size {} then, {} now", r.size, now.size)
            };
            return Err(Mismatch {
                path: r.path.clone(),
                detail: format!("its content changed since the checkpoint ({size})"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_file_hashed_on_several_threads_has_the_one_thread_hash() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pages-1.img");
        // Not a multiple of the chunk, so the last read is short.
        let data: Vec<u8> = (0..(PARALLEL_FROM as usize * 2 + 12_345)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        assert_eq!(hash_file(&p).unwrap(), blake3::hash(&data).to_hex().to_string());
        std::fs::write(&p, &data[..1000]).unwrap();
        assert_eq!(hash_file(&p).unwrap(), blake3::hash(&data[..1000]).to_hex().to_string());
    }

    #[test]
    fn same_size_different_content_is_a_mismatch_even_with_the_mtime_put_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("prog");
        std::fs::write(&p, b"build-A").unwrap();
        let mut cache = HashCache::load(d.path().join("cache.json"));
        let id = cache.identify(&p).unwrap();
        cache.save();
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::fs::write(&p, b"build-B").unwrap();
        std::fs::File::options().write(true).open(&p).unwrap().set_modified(mtime).unwrap();
        let mut cache = HashCache::load(d.path().join("cache.json"));
        let m = compare(std::slice::from_ref(&id), &mut cache, None).unwrap_err();
        assert!(m.detail.contains("same size 7"), "{}", m.detail);
        std::fs::write(&p, b"build-A").unwrap();
        assert_eq!(compare(std::slice::from_ref(&id), &mut cache, None), Ok(()), "same content again fits");
        std::fs::remove_file(&p).unwrap();
        assert!(compare(&[id], &mut cache, None).unwrap_err().detail.contains("no longer exists"));
    }

    #[test]
    fn a_recorded_path_replaced_by_a_fifo_or_a_symlink_is_a_mismatch_at_once() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lib x.so");
        std::fs::write(&p, b"code").unwrap();
        let id = HashCache::in_memory().identify(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let m = compare(std::slice::from_ref(&id), &mut HashCache::in_memory(), None).unwrap_err();
        assert!(m.detail.contains("a FIFO, not a regular file"), "{}", m.detail);
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        let m = compare(std::slice::from_ref(&id), &mut HashCache::in_memory(), None).unwrap_err();
        assert!(m.detail.contains("symbolic link"), "{}", m.detail);
    }
}
