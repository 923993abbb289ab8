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

/// BLAKE3 of a whole file, hex. Read, not mapped: a supervisor hashing a large binary must not
/// hold all of it resident. A large file is hashed on every CPU (BLAKE3's tree splits a chunk
/// across threads): one core hashes about 1 GiB/s, slower than the disk a checkpoint goes to.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    if file.metadata()?.len() < PARALLEL_FROM {
        h.update_reader(file)?;
        return Ok(h.finalize().to_hex().to_string());
    }
    // A pool of its own, ended with the hash: no threads stay behind in an idle supervisor.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let pool = rayon_core::ThreadPoolBuilder::new().num_threads(threads).build().map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; PARALLEL_CHUNK];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            break;
        }
        pool.install(|| h.update_rayon(&buf[..filled]));
    }
    Ok(h.finalize().to_hex().to_string())
}

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
    pub fn in_memory() -> HashCache {
        HashCache { path: PathBuf::new(), file: CacheFile::default(), dirty: false }
    }

    /// The identity of `path` now, hashing its content unless the cache vouches for it.
    pub fn identify(&mut self, path: &Path) -> std::io::Result<FileIdentity> {
        let before = std::fs::metadata(path)?;
        let k = key(&before);
        self.file.seq += 1;
        let seq = self.file.seq;
        let hash = match self.file.entries.get_mut(&k) {
            Some(entry) => {
                entry.1 = seq;
                entry.0.clone()
            }
            None => {
                let hash = hash_file(path)?;
                // A file that changed while it was read gets no cache entry.
                if std::fs::metadata(path).map(|m| key(&m)).ok().as_deref() == Some(k.as_str()) {
                    self.file.entries.insert(k, (hash.clone(), seq));
                }
                hash
            }
        };
        self.dirty = true;
        Ok(FileIdentity {
            path: path.to_path_buf(),
            size: before.size(),
            mtime_ns: mtime_ns(&before),
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
pub fn compare(recorded: &[FileIdentity], cache: &mut HashCache) -> Result<(), Mismatch> {
    for r in recorded {
        let now = cache.identify(&r.path).map_err(|e| Mismatch {
            path: r.path.clone(),
            detail: if e.kind() == std::io::ErrorKind::NotFound {
                "it no longer exists".to_string()
            } else {
                format!("it cannot be read ({e})")
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
        let m = compare(std::slice::from_ref(&id), &mut cache).unwrap_err();
        assert!(m.detail.contains("same size 7"), "{}", m.detail);
        std::fs::write(&p, b"build-A").unwrap();
        assert_eq!(compare(std::slice::from_ref(&id), &mut cache), Ok(()), "same content again fits");
        std::fs::remove_file(&p).unwrap();
        assert!(compare(&[id], &mut cache).unwrap_err().detail.contains("no longer exists"));
    }
}
