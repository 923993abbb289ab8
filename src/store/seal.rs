//! Encryption at rest (`encryption_key_file`): every image file of a checkpoint is stored as
//! `NAME.enc`, XChaCha20-Poly1305 in 1 MiB chunks, so the disk (and an export) holds no
//! plaintext memory. Each chunk's nonce is the file's random prefix and the chunk's number; its
//! associated data is the file's name and whether it is the last chunk, so chunks cannot be
//! reordered, dropped, cut short or moved to another file without the tag failing. The key
//! never leaves the key file; the manifest holds only its id (a keyed BLAKE3 of it), so a wrong
//! key is named before any decryption.

use super::StoreError;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const SUFFIX: &str = ".enc";
const MAGIC: &[u8; 8] = b"STASENC1";
/// Plain bytes per sealed chunk.
pub const CHUNK: usize = 1 << 20;
/// The file's head: the magic and the random nonce prefix.
pub const HEAD: usize = 24;
const TAG: usize = 16;

/// A key read from its file: 32 bytes, raw or as 64 hex digits.
pub struct Key([u8; 32]);

/// Why the key could not be used, each naming the file and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("failed to read the encryption key {}: {source}; {}", path.display(), create(path))]
    Missing { path: PathBuf, source: std::io::Error },
    #[error("the encryption key {p} must be owned by root and readable by nobody else (it is uid {uid}, mode {mode:o}); `chown root {p} && chmod 600 {p}`", p = path.display())]
    Unsafe { path: PathBuf, uid: u32, mode: u32 },
    #[error("failed to read the encryption key {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the encryption key {} is not 32 bytes (or 64 hex digits); {}", path.display(), create(path))]
    Malformed { path: PathBuf },
    /// A checkpoint sealed with key `key_id`, and the service `file` names no key file.
    #[error("its images are encrypted (key id {key_id}) and {} sets no encryption_key_file; set it to the file with that key", file.display())]
    NotSet { key_id: String, file: PathBuf },
    #[error("it was encrypted with the key of id {key_id}, and {} holds the key of id {found}: the wrong key; put the right key back", path.display())]
    Wrong { key_id: String, path: PathBuf, found: String },
}

/// How to make a key file.
fn create(path: &Path) -> String {
    format!("create it with `head -c 32 /dev/urandom > {p} && chmod 600 {p}` (as root)", p = path.display())
}

impl Key {
    /// Only root may read the file: a key others can read protects nothing.
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        use std::os::unix::fs::MetadataExt;
        let path_buf = || path.to_path_buf();
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Missing { path: path_buf(), source })?;
        if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
            return Err(KeyError::Unsafe { path: path_buf(), uid: meta.uid(), mode: meta.mode() & 0o777 });
        }
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read { path: path_buf(), source })?;
        let text = String::from_utf8_lossy(&bytes);
        let hex = text.trim();
        let raw: Option<Vec<u8>> = if bytes.len() == 32 {
            Some(bytes.clone())
        } else if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32).map(|i| u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).ok()).collect()
        } else {
            None
        };
        let raw = raw.ok_or_else(|| KeyError::Malformed { path: path_buf() })?;
        let mut k = [0u8; 32];
        k.copy_from_slice(&raw);
        Ok(Key(k))
    }

    /// The key in `path` (the service's `encryption_key_file`, set in `service_file`), which
    /// must be the one of id `key_id` a checkpoint was sealed with.
    pub fn matching(path: Option<&Path>, key_id: &str, service_file: &Path) -> Result<Key, KeyError> {
        let path =
            path.ok_or_else(|| KeyError::NotSet { key_id: key_id.to_string(), file: service_file.to_path_buf() })?;
        let key = Key::load(path)?;
        if key.id() != key_id {
            return Err(KeyError::Wrong { key_id: key_id.to_string(), path: path.to_path_buf(), found: key.id() });
        }
        Ok(key)
    }

    /// What the manifest records: says which key, gives away nothing of it.
    pub fn id(&self) -> String {
        let id = blake3::keyed_hash(&self.0, b"stasis encryption key id");
        id.to_hex()[..16].to_string()
    }

    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }
}

fn nonce(prefix: &[u8; 16], n: u64) -> XNonce {
    let mut b = [0u8; 24];
    b[..16].copy_from_slice(prefix);
    b[16..].copy_from_slice(&n.to_be_bytes());
    XNonce::from(b)
}

fn aad(name: &str, last: bool) -> Vec<u8> {
    let mut a = name.as_bytes().to_vec();
    a.push(u8::from(last));
    a
}

/// Replaces every file in `images` by its sealed `.enc`.
pub fn seal_dir(images: &Path, key: &Key) -> Result<(), StoreError> {
    let rd = std::fs::read_dir(images).map_err(|source| StoreError::Read { path: images.to_path_buf(), source })?;
    for e in rd {
        let e = e.map_err(|source| StoreError::Read { path: images.to_path_buf(), source })?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(SUFFIX) {
            continue;
        }
        let to = images.join(format!("{name}{SUFFIX}"));
        let input = std::fs::File::open(e.path()).map_err(|source| StoreError::Read { path: e.path(), source })?;
        let out = std::fs::File::create(&to).map_err(|source| StoreError::Write { path: to.clone(), source })?;
        seal(input, std::io::BufWriter::with_capacity(CHUNK + TAG, out), &name, key)
            .map_err(|source| StoreError::Write { path: to.clone(), source })?;
        std::fs::remove_file(e.path()).map_err(|source| StoreError::Write { path: e.path(), source })?;
    }
    Ok(())
}

/// An image in `images` that is not sealed, if any.
pub fn first_unsealed(images: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(images)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(SUFFIX)))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `name` is the plain file's name (bound into every chunk).
pub fn seal(mut input: impl Read, out: impl Write, name: &str, key: &Key) -> std::io::Result<()> {
    let mut sealer = Sealer::new(out, name, key)?;
    std::io::copy(&mut input, &mut sealer)?;
    sealer.finish()?.flush()
}

/// Seals what is written through it, chunk by chunk, into `out`: the same bytes [`seal`]
/// writes, for a writer that gets its input in pieces (the pages CRIU sends as it dumps).
pub struct Sealer<W: Write> {
    out: W,
    cipher: XChaCha20Poly1305,
    prefix: [u8; 16],
    aad_name: String,
    /// The chunk being filled; it is sealed only when more input shows it is not the last.
    held: Vec<u8>,
    n: u64,
}

impl<W: Write> Sealer<W> {
    pub fn new(mut out: W, name: &str, key: &Key) -> std::io::Result<Sealer<W>> {
        let mut prefix = [0u8; 16];
        // SAFETY: fills the buffer it is given.
        if unsafe { libc::getrandom(prefix.as_mut_ptr().cast(), prefix.len(), 0) } != prefix.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        out.write_all(MAGIC)?;
        out.write_all(&prefix)?;
        Ok(Sealer {
            out,
            cipher: key.cipher(),
            prefix,
            aad_name: name.to_string(),
            held: Vec::with_capacity(CHUNK),
            n: 0,
        })
    }

    fn seal_held(&mut self, last: bool) -> std::io::Result<()> {
        let ct = self
            .cipher
            .encrypt(&nonce(&self.prefix, self.n), Payload { msg: &self.held, aad: &aad(&self.aad_name, last) })
            .map_err(|_| std::io::Error::other("encryption failed"))?;
        self.out.write_all(&ct)?;
        self.held.clear();
        self.n += 1;
        Ok(())
    }

    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// Seals the last chunk (empty when the input was) and hands the writer back.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.seal_held(true)?;
        Ok(self.out)
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.held.len() == CHUNK {
            self.seal_held(false)?;
        }
        let take = buf.len().min(CHUNK - self.held.len());
        self.held.extend_from_slice(&buf[..take]);
        Ok(take)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A sealed file opened anywhere, one chunk at a time (a lazy restore reads its pages where
/// they are): chunk `i` is stored at [`SealedChunks::range`] and opened alone, its tag checked
/// with its number and whether it is the last bound in, as [`Opener`] does in order.
pub struct SealedChunks {
    cipher: XChaCha20Poly1305,
    prefix: [u8; 16],
    name: String,
    body: u64,
    chunks: u64,
}

impl SealedChunks {
    /// `head`: the file's first [`HEAD`] bytes; `stored_len`: its length; `name`: the plain
    /// file's name (bound into every chunk).
    pub fn new(head: &[u8], stored_len: u64, name: &str, key: &Key) -> Result<SealedChunks, OpenError> {
        if head.len() < HEAD || &head[..8] != MAGIC || stored_len < (HEAD + TAG) as u64 {
            return Err(OpenError::NotSealed);
        }
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&head[8..HEAD]);
        let body = stored_len - HEAD as u64;
        let chunks = body.div_ceil((CHUNK + TAG) as u64).max(1);
        // Every chunk but the last is whole, and the last holds at least its tag.
        if body - (chunks - 1) * ((CHUNK + TAG) as u64) < (TAG as u64) {
            return Err(OpenError::Tag);
        }
        Ok(SealedChunks { cipher: key.cipher(), prefix, name: name.to_string(), body, chunks })
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// What the file opens to, in bytes.
    pub fn plain_len(&self) -> u64 {
        self.body - self.chunks * TAG as u64
    }

    /// Where chunk `i` is stored.
    pub fn range(&self, i: u64) -> std::ops::Range<u64> {
        let start = HEAD as u64 + i * (CHUNK + TAG) as u64;
        start..(start + (CHUNK + TAG) as u64).min(HEAD as u64 + self.body)
    }

    /// Chunk `i`'s plain bytes, from its stored bytes.
    pub fn open(&self, i: u64, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let last = i + 1 == self.chunks;
        self.cipher
            .decrypt(&nonce(&self.prefix, i), Payload { msg: sealed, aad: &aad(&self.name, last) })
            .map_err(|_| OpenError::Tag)
    }
}

/// Why a sealed file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("it is not sealed by stasis")]
    NotSealed,
    /// The tag failed: the wrong key, or damage.
    #[error("it does not decrypt with this key (a wrong key, or the file is damaged)")]
    Tag,
}

pub fn open(input: impl Read, mut out: impl Write, name: &str, key: &Key) -> Result<(), OpenError> {
    let mut opener = Opener::new(input, name, key);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match opener.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(OpenError::from_io(e)),
        };
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    Ok(())
}

impl OpenError {
    /// What an [`Opener`]'s read error was.
    pub fn from_io(e: std::io::Error) -> OpenError {
        match e.get_ref().and_then(|i| i.downcast_ref::<OpenError>()) {
            Some(OpenError::NotSealed) => OpenError::NotSealed,
            Some(OpenError::Tag) => OpenError::Tag,
            _ => OpenError::Io(e),
        }
    }

    fn into_io(self) -> std::io::Error {
        match self {
            OpenError::Io(e) => e,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

/// A sealed file's plaintext as a reader: each chunk is decrypted, and its tag checked, before
/// any of its bytes is handed on; the last one is known by reading one chunk ahead. Errors are
/// `std::io::Error`s carrying an [`OpenError`] ([`OpenError::from_io`]); after one, every
/// read fails.
pub struct Opener<R> {
    input: R,
    name: String,
    cipher: XChaCha20Poly1305,
    prefix: Option<[u8; 16]>,
    held: Vec<u8>,
    held_len: usize,
    next: Vec<u8>,
    n: u64,
    plain: Vec<u8>,
    pos: usize,
    done: bool,
    failed: bool,
}

impl<R: Read> Opener<R> {
    /// `name` is the plain file's name (bound into every chunk).
    pub fn new(input: R, name: &str, key: &Key) -> Opener<R> {
        Opener {
            input,
            name: name.to_string(),
            cipher: key.cipher(),
            prefix: None,
            held: Vec::new(),
            held_len: 0,
            next: Vec::new(),
            n: 0,
            plain: Vec::new(),
            pos: 0,
            done: false,
            failed: false,
        }
    }

    /// Decrypts the next chunk into `plain`; false at the end.
    fn advance(&mut self) -> Result<bool, OpenError> {
        if self.done {
            return Ok(false);
        }
        let prefix = match self.prefix {
            Some(p) => p,
            None => {
                let mut head = [0u8; 24];
                if read_full(&mut self.input, &mut head)? != 24 || &head[..8] != MAGIC {
                    return Err(OpenError::NotSealed);
                }
                let mut p = [0u8; 16];
                p.copy_from_slice(&head[8..]);
                self.prefix = Some(p);
                self.held = vec![0u8; CHUNK + TAG];
                self.next = vec![0u8; CHUNK + TAG];
                self.held_len = read_full(&mut self.input, &mut self.held)?;
                p
            }
        };
        let next_len = if self.held_len == CHUNK + TAG { read_full(&mut self.input, &mut self.next)? } else { 0 };
        let last = next_len == 0;
        self.plain = self
            .cipher
            .decrypt(&nonce(&prefix, self.n), Payload { msg: &self.held[..self.held_len], aad: &aad(&self.name, last) })
            .map_err(|_| OpenError::Tag)?;
        self.pos = 0;
        if last {
            self.done = true;
        } else {
            std::mem::swap(&mut self.held, &mut self.next);
            self.held_len = next_len;
            self.n += 1;
        }
        Ok(true)
    }
}

impl<R: Read> Read for Opener<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.failed {
            return Err(OpenError::Io(std::io::Error::other("an earlier chunk failed")).into_io());
        }
        while self.pos == self.plain.len() {
            match self.advance() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => {
                    self.failed = true;
                    return Err(e.into_io());
                }
            }
        }
        let n = out.len().min(self.plain.len() - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key([b; 32])
    }

    #[test]
    fn round_trips_at_every_chunk_boundary() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut sealed = Vec::new();
            seal(data.as_slice(), &mut sealed, "pages-1.img", &key(7)).unwrap();
            let mut plain = Vec::new();
            open(sealed.as_slice(), &mut plain, "pages-1.img", &key(7)).unwrap();
            assert_eq!(plain, data, "{len} bytes");
        }
    }

    #[test]
    fn a_sealer_fed_in_pieces_opens_as_the_whole() {
        for len in [0, 7, CHUNK, CHUNK + 5, 3 * CHUNK - 1] {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let mut s = Sealer::new(Vec::new(), "pages-2.img.zst", &key(3)).unwrap();
            for piece in data.chunks(4096 * 3 + 17) {
                s.write_all(piece).unwrap();
            }
            let sealed = s.finish().unwrap();
            let mut plain = Vec::new();
            open(sealed.as_slice(), &mut plain, "pages-2.img.zst", &key(3)).unwrap();
            assert_eq!(plain, data, "{len} bytes");
            let chunks = len.div_ceil(CHUNK).max(1);
            assert_eq!(sealed.len(), 24 + len + chunks * TAG, "{len} bytes: one tag per chunk");
        }
    }

    #[test]
    fn wrong_key_cut_short_flipped_or_renamed_all_fail() {
        let data = vec![42u8; CHUNK + 100];
        let mut sealed = Vec::new();
        seal(data.as_slice(), &mut sealed, "core-1.img", &key(1)).unwrap();
        let fails = |bytes: &[u8], name: &str, k: &Key| open(bytes, &mut Vec::new(), name, k).is_err();
        assert!(fails(&sealed, "core-1.img", &key(2)), "wrong key");
        assert!(fails(&sealed[..24 + CHUNK + TAG], "core-1.img", &key(1)), "last chunk dropped");
        let mut flipped = sealed.clone();
        flipped[100] ^= 1;
        assert!(fails(&flipped, "core-1.img", &key(1)), "a bit flip");
        assert!(fails(&sealed, "core-2.img", &key(1)), "moved to another file");
        assert!(!String::from_utf8_lossy(&sealed).contains("**********"), "no plaintext");
        assert_ne!(key(1).id(), key(2).id());
    }
}
