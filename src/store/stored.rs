//! Writing one image of a checkpoint as its bytes arrive (the pages CRIU sends while it dumps):
//! compressed and sealed in the same pass, and hashed over exactly the bytes that reach the
//! disk, so no image is read back to be hashed, compressed or sealed. Writeback starts as the
//! file grows, so the fsync that makes the checkpoint durable mostly finds nothing left to do.

use super::frames::FramedEncoder;
use super::manifest::ImageFile;
use super::seal::{Key, Sealer};
use super::StoreError;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Writeback is started every this many bytes.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// What happens to an image's bytes on their way to the disk.
#[derive(Clone, Copy)]
pub struct Transform<'k> {
    /// zstd level for memory pages (`compression: zstd`); other images stay as they are.
    pub compression: Option<i32>,
    /// Seal every image (`encryption_key_file`).
    pub key: Option<&'k Key>,
}

impl Transform<'_> {
    /// The name an image is stored under: the name CRIU knows, with the suffixes of what was
    /// done to it, in the order it was done (compress::SUFFIX, then seal::SUFFIX).
    pub fn stored_name(&self, plain: &str) -> String {
        let mut name = plain.to_string();
        if self.compresses(plain) {
            name.push_str(super::compress::SUFFIX);
        }
        if self.key.is_some() {
            name.push_str(super::seal::SUFFIX);
        }
        name
    }

    fn compresses(&self, plain: &str) -> bool {
        self.compression.is_some() && super::compress::is_pages(plain)
    }
}

/// Pieces in flight to a hashing thread: enough to keep it busy while the writer waits on
/// the socket or the disk.
const HASH_QUEUE: usize = 4;

/// Where the bytes written are hashed: here, or (a memory image: nearly all the bytes) on a
/// thread of its own, so that hashing overlaps receiving and writing on another CPU instead
/// of adding to the time the service is frozen.
enum Hashing {
    Here(super::chunks::ChunkHasher),
    Beside {
        pieces: std::sync::mpsc::SyncSender<Vec<u8>>,
        spare: std::sync::mpsc::Receiver<Vec<u8>>,
        in_flight: usize,
        done: std::thread::JoinHandle<super::chunks::ChunkHasher>,
    },
}

impl Hashing {
    fn beside() -> std::io::Result<Hashing> {
        let (pieces, todo) = std::sync::mpsc::sync_channel::<Vec<u8>>(HASH_QUEUE);
        // Room for every piece there is: one coming back never waits, and none is dropped.
        let (back, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(2 * HASH_QUEUE);
        let done = std::thread::Builder::new().name("stasis-hash".into()).spawn(move || {
            let mut h = super::chunks::ChunkHasher::new();
            for piece in todo {
                h.update(&piece);
                let _ = back.try_send(piece);
            }
            h
        })?;
        Ok(Hashing::Beside { pieces, spare, in_flight: 0, done })
    }

    fn update(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Hashing::Here(h) => {
                h.update(bytes);
            }
            Hashing::Beside { pieces, spare, in_flight, .. } => {
                // A spare piece when one came back; a new one while fewer than the queue exist.
                let mut piece = match spare.try_recv() {
                    Ok(p) => p,
                    Err(_) if *in_flight < 2 * HASH_QUEUE => {
                        *in_flight += 1;
                        Vec::with_capacity(bytes.len())
                    }
                    Err(_) => spare.recv().map_err(|_| std::io::Error::other("the hashing thread ended"))?,
                };
                piece.clear();
                piece.extend_from_slice(bytes);
                pieces.send(piece).map_err(|_| std::io::Error::other("the hashing thread ended"))?;
            }
        }
        Ok(())
    }

    fn finish(self) -> std::io::Result<super::chunks::ChunkHasher> {
        match self {
            Hashing::Here(h) => Ok(h),
            Hashing::Beside { pieces, done, .. } => {
                drop(pieces);
                done.join().map_err(|_| std::io::Error::other("the hashing thread panicked"))
            }
        }
    }
}

/// The end of every chain: the file, and the hash of what went into it.
struct Disk {
    file: File,
    path: PathBuf,
    hasher: Hashing,
    written: u64,
    writeback_from: u64,
}

impl Write for Disk {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n])?;
        self.written += n as u64;
        if self.written - self.writeback_from >= WRITEBACK_EVERY {
            // SAFETY: a valid fd; the call only starts writeback of a range and touches no memory.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.writeback_from as i64,
                    (self.written - self.writeback_from) as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.writeback_from = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Chain {
    Plain(Disk),
    Sealed(Sealer<Disk>),
    /// Frames a lazy restore can decode one at a time (store::frames), on every CPU.
    Compressed(FramedEncoder<Disk>),
    Both(FramedEncoder<Sealer<Disk>>),
}

/// An image as it was stored: its manifest entry, and the chunk hashes its restore checks
/// each 1 MiB against (store::chunks).
#[derive(Debug, Clone)]
pub struct Stored {
    pub file: ImageFile,
    pub cvs: Vec<super::chunks::Cv>,
}

/// One image being written; [`StoredWriter::finish`] says what was stored.
pub struct StoredWriter {
    chain: Chain,
    /// Relative to the checkpoint directory, as the manifest names it.
    rel: String,
}

impl StoredWriter {
    /// Creates `images/PLAIN` (with the transform's suffixes) under the checkpoint's images
    /// directory `images`; a file of that name must not exist yet.
    pub fn create(images: &Path, plain: &str, t: &Transform<'_>) -> Result<StoredWriter, StoreError> {
        Self::create_under(images, super::manifest::IMAGES_DIR, plain, t)
    }

    /// The same, in a directory the manifest names `rel_dir` (relative to the checkpoint
    /// directory: `images`, or `images/pre-dump` for a pre-copy stop's pre-dump).
    pub fn create_under(
        images: &Path,
        rel_dir: &str,
        plain: &str,
        t: &Transform<'_>,
    ) -> Result<StoredWriter, StoreError> {
        let stored = t.stored_name(plain);
        let path = images.join(&stored);
        let write = |source| StoreError::Write { path: path.clone(), source };
        let file = File::options().write(true).create_new(true).open(&path).map_err(write)?;
        let hasher = if super::compress::is_pages(plain) {
            Hashing::beside().map_err(write)?
        } else {
            Hashing::Here(super::chunks::ChunkHasher::new())
        };
        let disk = Disk { file, path: path.clone(), hasher, written: 0, writeback_from: 0 };
        // The sealed bytes are bound to the name of what was sealed (the compressed file's).
        let sealed_name = stored.strip_suffix(super::seal::SUFFIX).unwrap_or(&stored).to_string();
        let level = t.compression.unwrap_or(3);
        let chain = match (t.compresses(plain), t.key) {
            (false, None) => Chain::Plain(disk),
            (false, Some(k)) => Chain::Sealed(Sealer::new(disk, &sealed_name, k).map_err(write)?),
            (true, None) => Chain::Compressed(FramedEncoder::new(disk, level)),
            (true, Some(k)) => {
                Chain::Both(FramedEncoder::new(Sealer::new(disk, &sealed_name, k).map_err(write)?, level))
            }
        };
        let rel = format!("{rel_dir}/{stored}");
        Ok(StoredWriter { chain, rel })
    }

    fn path(&self) -> PathBuf {
        let disk = match &self.chain {
            Chain::Plain(d) => d,
            Chain::Sealed(s) => s.get_ref(),
            Chain::Compressed(z) => z.get_ref(),
            Chain::Both(z) => z.get_ref().get_ref(),
        };
        disk.path.clone()
    }

    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        let r = match &mut self.chain {
            Chain::Plain(d) => d.write_all(buf),
            Chain::Sealed(s) => s.write_all(buf),
            Chain::Compressed(z) => z.write_all(buf),
            Chain::Both(z) => z.write_all(buf),
        };
        r.map_err(|source| StoreError::Write { path: self.path(), source })
    }

    /// Ends every stage and says what is on the disk (not yet fsynced: the checkpoint's
    /// finalize does that for every file at once).
    pub fn finish(self) -> Result<Stored, StoreError> {
        let path = self.path();
        let write = |source| StoreError::Write { path: path.clone(), source };
        let disk = match self.chain {
            Chain::Plain(d) => d,
            Chain::Sealed(s) => s.finish().map_err(write)?,
            Chain::Compressed(z) => z.finish().map_err(write)?,
            Chain::Both(z) => z.finish().and_then(Sealer::finish).map_err(write)?,
        };
        let (hash, cvs) = disk.hasher.finish().map_err(write)?.finalize();
        Ok(Stored { file: ImageFile { path: self.rel, size: disk.written, hash: hash.to_hex().to_string() }, cvs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(t: &Transform<'_>, plain: &str, data: &[u8]) -> (tempfile::TempDir, ImageFile) {
        let (d, s) = stored(t, plain, data);
        let (_, _, cvs) =
            super::super::chunks::hash_file(&d.path().join(s.file.path.trim_start_matches("images/"))).unwrap();
        assert_eq!(s.cvs, cvs, "the chunk hashes are those of the bytes on disk");
        (d, s.file)
    }

    fn stored(t: &Transform<'_>, plain: &str, data: &[u8]) -> (tempfile::TempDir, Stored) {
        let d = tempfile::tempdir().unwrap();
        let mut w = StoredWriter::create(d.path(), plain, t).unwrap();
        for piece in data.chunks(65536 + 3) {
            w.write_all(piece).unwrap();
        }
        let f = w.finish().unwrap();
        (d, f)
    }

    #[test]
    fn the_hash_and_size_are_of_the_bytes_on_disk() {
        let key = Key::from_bytes([9; 32]);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 7) as u8).collect();
        for t in [
            Transform { compression: None, key: None },
            Transform { compression: Some(3), key: None },
            Transform { compression: None, key: Some(&key) },
            Transform { compression: Some(1), key: Some(&key) },
        ] {
            let (d, f) = written(&t, "pages-1.img", &data);
            let on_disk = std::fs::read(d.path().join(f.path.strip_prefix("images/").unwrap())).unwrap();
            assert_eq!(f.size, on_disk.len() as u64, "{}", f.path);
            assert_eq!(f.hash, blake3::hash(&on_disk).to_hex().to_string(), "{}", f.path);
            // And it reads back as what was written, through the same steps as a restore.
            let mut plain = on_disk.clone();
            if t.key.is_some() {
                let name = f.path.trim_start_matches("images/").trim_end_matches(".enc");
                plain.clear();
                super::super::seal::open(on_disk.as_slice(), &mut plain, name, &key).unwrap();
            }
            if t.compression.is_some() {
                plain = zstd::decode_all(plain.as_slice()).unwrap();
            }
            assert_eq!(plain, data, "{}", f.path);
        }
    }

    #[test]
    fn only_pages_are_compressed_and_every_image_is_sealed() {
        let key = Key::from_bytes([1; 32]);
        let t = Transform { compression: Some(3), key: Some(&key) };
        assert_eq!(t.stored_name("pages-3.img"), "pages-3.img.zst.enc");
        assert_eq!(t.stored_name("pagemap-1.img"), "pagemap-1.img.enc");
        let (_d, f) = written(&t, "pagemap-1.img", b"x");
        assert_eq!(f.path, "images/pagemap-1.img.enc");
    }
}
