//! Chunk hashes of a stored image, so its bytes can be checked as they are read instead of in a
//! pass of their own. The manifest holds each image's BLAKE3 hash; BLAKE3 is a tree, and the
//! chaining values (CVs) of the file's aligned 1 MiB groups, merged as BLAKE3 merges subtrees,
//! give exactly that hash. So a list of CVs needs no checksum of its own: it is trusted once it
//! merges to the manifest's hash, and from then on each group of the file is checked alone
//! against its CV (as in the bao encoding, without the interleaving).
//!
//! The CVs of a file larger than one group are kept beside the checkpoint's images, as
//! `chunks/NAME.cv` (outside `images/`: nothing that lists or exports images sees them). A file
//! of one group or less needs none: its group is checked against the hash itself. A missing
//! sidecar, or one that does not merge to the hash, is no damage: the CVs are computed again by
//! reading the file once (what a verification cost before), and the restore says so.

use super::manifest::ImageFile;
use super::StoreError;
use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The bytes of one group: a power of two of BLAKE3 chunks, so every group is a whole subtree.
pub const GROUP: usize = 1 << 20;
/// The directory of a checkpoint that holds the sidecars.
pub const DIR: &str = "chunks";
pub const SUFFIX: &str = ".cv";
const MAGIC: &[u8; 8] = b"STASCV\r\n";
const VERSION: u32 = 1;
/// magic, version (u32), group size (u32), count (u64), all little-endian; then the CVs.
const HEADER: usize = 8 + 4 + 4 + 8;

/// The chaining value of one group.
pub type Cv = ChainingValue;

/// How many groups a file of `len` bytes has (an empty file has one, empty).
pub fn groups(len: u64) -> u64 {
    len.div_ceil(GROUP as u64).max(1)
}

/// The length of group `index` of a file of `len` bytes.
pub fn group_len(len: u64, index: u64) -> usize {
    let start = index * GROUP as u64;
    len.saturating_sub(start).min(GROUP as u64) as usize
}

/// BLAKE3 of a stream, and the CVs of its groups, in one pass over the bytes. Any sizes of
/// `update` give the same result. The root is computed from the CVs, so the CVs are right
/// whenever the root is.
pub struct ChunkHasher {
    current: blake3::Hasher,
    /// Bytes in the current group.
    in_group: usize,
    /// The CVs of the groups before the current one.
    cvs: Vec<Cv>,
    total: u64,
}

impl Default for ChunkHasher {
    fn default() -> Self {
        ChunkHasher::new()
    }
}

impl ChunkHasher {
    pub fn new() -> ChunkHasher {
        ChunkHasher { current: blake3::Hasher::new(), in_group: 0, cvs: Vec::new(), total: 0 }
    }

    pub fn update(&mut self, bytes: &[u8]) -> &mut Self {
        self.feed(bytes, |h, b| {
            h.update(b);
        })
    }

    /// The same, each group hashed on the threads of the current rayon pool (a large buffer).
    pub fn update_rayon(&mut self, bytes: &[u8]) -> &mut Self {
        self.feed(bytes, |h, b| {
            h.update_rayon(b);
        })
    }

    fn feed(&mut self, mut bytes: &[u8], hash: impl Fn(&mut blake3::Hasher, &[u8])) -> &mut Self {
        while !bytes.is_empty() {
            // A full group is closed only when more comes: a file of exactly one group has no CV.
            if self.in_group == GROUP {
                let cv = self.current.finalize_non_root();
                self.cvs.push(cv);
                self.current = blake3::Hasher::new();
                self.current.set_input_offset(self.cvs.len() as u64 * GROUP as u64);
                self.in_group = 0;
            }
            let take = (GROUP - self.in_group).min(bytes.len());
            hash(&mut self.current, &bytes[..take]);
            self.in_group += take;
            self.total += take as u64;
            bytes = &bytes[take..];
        }
        self
    }

    /// The bytes hashed so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The BLAKE3 hash of everything given, and the CVs of its groups (none for one group).
    pub fn finalize(self) -> (blake3::Hash, Vec<Cv>) {
        if self.cvs.is_empty() {
            return (self.current.finalize(), Vec::new());
        }
        let mut cvs = self.cvs;
        cvs.push(self.current.finalize_non_root());
        let root = root_of(&cvs, self.total);
        (root, cvs)
    }
}

/// The root of the CVs of a file of `len` bytes (more than one group), merged as BLAKE3's
/// left-balanced tree: every split falls on a group boundary, since a group is a power of two
/// of chunks.
fn root_of(cvs: &[Cv], len: u64) -> blake3::Hash {
    debug_assert!(cvs.len() >= 2 && cvs.len() as u64 == groups(len));
    let left = left_subtree_len(len);
    let split = (left / GROUP as u64) as usize;
    merge_subtrees_root(&subtree(&cvs[..split], left), &subtree(&cvs[split..], len - left), Mode::Hash)
}

fn subtree(cvs: &[Cv], len: u64) -> Cv {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_subtree_len(len);
    let split = (left / GROUP as u64) as usize;
    merge_subtrees_non_root(&subtree(&cvs[..split], left), &subtree(&cvs[split..], len - left), Mode::Hash)
}

/// A group whose bytes are not the ones hashed into the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMismatch {
    pub group: u64,
    pub groups: u64,
    /// Where the group starts in the stored file, and its length.
    pub offset: u64,
    pub len: usize,
}

impl std::fmt::Display for ChunkMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = self.offset + (self.len as u64).max(1) - 1;
        write!(f, "bytes {} to {last} (chunk {} of {})", self.offset, self.group + 1, self.groups)
    }
}

impl std::error::Error for ChunkMismatch {}

/// Checks each group of one file against the manifest's hash of the file.
#[derive(Debug, Clone)]
pub struct ChunkVerifier {
    root: blake3::Hash,
    size: u64,
    /// Empty for a file of one group.
    cvs: Vec<Cv>,
}

impl ChunkVerifier {
    /// Trusts `cvs` only when they are as many as the file's groups and merge to `root`.
    pub fn new(root: blake3::Hash, size: u64, cvs: Vec<Cv>) -> Result<ChunkVerifier, String> {
        let n = groups(size);
        if n == 1 {
            return Ok(ChunkVerifier { root, size, cvs: Vec::new() });
        }
        if cvs.len() as u64 != n {
            return Err(format!("it holds {} chunk hashes for {n} chunks", cvs.len()));
        }
        if root_of(&cvs, size) != root {
            return Err("its chunk hashes do not add up to the manifest's checksum".into());
        }
        Ok(ChunkVerifier { root, size, cvs })
    }

    /// For a file of one group: the manifest's hash is all it needs.
    pub fn needs_cvs(size: u64) -> bool {
        groups(size) > 1
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn groups(&self) -> u64 {
        groups(self.size)
    }

    pub fn group_len(&self, index: u64) -> usize {
        group_len(self.size, index)
    }

    /// Whether `bytes` are group `index` as hashed into the manifest.
    pub fn verify(&self, index: u64, bytes: &[u8]) -> Result<(), ChunkMismatch> {
        let groups = self.groups();
        let mismatch = || ChunkMismatch { group: index, groups, offset: index * GROUP as u64, len: bytes.len() };
        if index >= groups || bytes.len() != self.group_len(index) {
            return Err(mismatch());
        }
        let ok = if self.cvs.is_empty() {
            blake3::hash(bytes) == self.root
        } else {
            let mut h = blake3::Hasher::new();
            h.set_input_offset(index * GROUP as u64);
            h.update(bytes);
            h.finalize_non_root() == self.cvs[index as usize]
        };
        if ok {
            Ok(())
        } else {
            Err(mismatch())
        }
    }
}

/// The sidecar's bytes.
pub fn encode(cvs: &[Cv]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + cvs.len() * 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(GROUP as u32).to_le_bytes());
    out.extend_from_slice(&(cvs.len() as u64).to_le_bytes());
    for cv in cvs {
        out.extend_from_slice(cv);
    }
    out
}

/// A sidecar's CVs, if it is one of this format.
pub fn decode(bytes: &[u8]) -> Result<Vec<Cv>, String> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err("it is not a chunk-hash file".into());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let group = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let count = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    if version != VERSION || group as usize != GROUP {
        return Err(format!(
            "it is of version {version} with groups of {group} bytes (this stasis reads version {VERSION}, {GROUP})"
        ));
    }
    let body = &bytes[HEADER..];
    if body.len() as u64 != count.saturating_mul(32) {
        return Err(format!("it says {count} chunk hashes and holds {} bytes of them", body.len()));
    }
    Ok(body.chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect())
}

/// Where the sidecar of the image at `rel` (`images/NAME`) is; none for a name in a subdirectory.
pub fn sidecar_path(checkpoint_dir: &Path, rel: &str) -> Option<PathBuf> {
    let name = rel.strip_prefix("images/").filter(|n| !n.is_empty() && !n.contains('/'))?;
    Some(checkpoint_dir.join(DIR).join(format!("{name}{SUFFIX}")))
}

/// Writes the sidecars of `images` (relative path, CVs) under `checkpoint_dir`, each atomically
/// and fsynced, then the directory and the checkpoint directory. Images of one group have none.
/// Returns the bytes written.
pub fn write_sidecars(checkpoint_dir: &Path, images: &[(String, Vec<Cv>)]) -> Result<u64, StoreError> {
    let wanted: Vec<(PathBuf, &Vec<Cv>)> = images
        .iter()
        .filter(|(_, cvs)| !cvs.is_empty())
        .filter_map(|(rel, cvs)| Some((sidecar_path(checkpoint_dir, rel)?, cvs)))
        .collect();
    if wanted.is_empty() {
        return Ok(0);
    }
    let dir = checkpoint_dir.join(DIR);
    super::durable::create_dir_with_mode(&dir, 0o700)?;
    let mut bytes = 0;
    for (path, cvs) in wanted {
        let body = encode(cvs);
        bytes += body.len() as u64;
        super::durable::write_atomic_with(&path, &body, super::durable::Durability::File)?;
    }
    super::durable::fsync_dir(&dir)?;
    super::durable::fsync_dir(checkpoint_dir)?;
    Ok(bytes)
}

/// The size, BLAKE3 hash and CVs of the file at `path`, in one read. A large file is hashed on
/// several threads of a pool of its own, as `identity::hash_open` does.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, blake3::Hash, Vec<Cv>)> {
    const PARALLEL_FROM: u64 = 8 << 20;
    const PIECE: usize = 4 << 20;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut hasher = ChunkHasher::new();
    let pool = if len >= PARALLEL_FROM {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        Some(rayon_core::ThreadPoolBuilder::new().num_threads(threads).build().map_err(std::io::Error::other)?)
    } else {
        None
    };
    let mut buf = vec![0u8; if pool.is_some() { PIECE } else { 64 << 10 }];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        match &pool {
            Some(pool) => pool.install(|| {
                hasher.update_rayon(&buf[..n]);
            }),
            None => {
                hasher.update(&buf[..n]);
            }
        }
    }
    let size = hasher.total();
    let (root, cvs) = hasher.finalize();
    Ok((size, root, cvs))
}

/// Why a group check could not be set up or failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("it does not match its checksum (its content was damaged)")]
    Checksum,
    #[error("it has {found} bytes, the manifest says {expected}")]
    Size { expected: u64, found: u64 },
    #[error("the manifest's checksum of it is not a BLAKE3 hash")]
    BadHash,
    #[error("it cannot be read ({0})")]
    Read(std::io::Error),
}

/// The verifier of `image` (a file of the checkpoint in `checkpoint_dir`), from its sidecar, or
/// else from one read of the file; the second value says why the sidecar was not used.
pub fn verifier(checkpoint_dir: &Path, image: &ImageFile) -> Result<(ChunkVerifier, Option<String>), ChunkError> {
    let root = blake3::Hash::from_hex(&image.hash).map_err(|_| ChunkError::BadHash)?;
    if !ChunkVerifier::needs_cvs(image.size) {
        return Ok((ChunkVerifier::new(root, image.size, Vec::new()).expect("one group needs no CVs"), None));
    }
    let why = match sidecar_path(checkpoint_dir, &image.path).map(std::fs::read) {
        None => "it is in a subdirectory, which has no chunk hashes".to_string(),
        Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => "its chunk hashes are missing".to_string(),
        Some(Err(e)) => format!("its chunk hashes cannot be read ({e})"),
        Some(Ok(bytes)) => match decode(&bytes).and_then(|cvs| ChunkVerifier::new(root, image.size, cvs)) {
            Ok(v) => return Ok((v, None)),
            Err(e) => format!("its chunk hashes are damaged ({e})"),
        },
    };
    let file = std::fs::File::open(checkpoint_dir.join(&image.path)).map_err(ChunkError::Read)?;
    let mut hasher = ChunkHasher::new();
    let mut buf = vec![0u8; GROUP];
    let mut reader = file.take(image.size + 1);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ChunkError::Read(e)),
        };
        hasher.update(&buf[..n]);
    }
    if hasher.total() != image.size {
        return Err(ChunkError::Size { expected: image.size, found: hasher.total() });
    }
    let (found, cvs) = hasher.finalize();
    if found != root {
        return Err(ChunkError::Checksum);
    }
    let v = ChunkVerifier::new(root, image.size, cvs).expect("CVs of the bytes that hash to the root");
    Ok((v, Some(format!("{why}: computed them by reading it once"))))
}

/// A stored file read group by group, each checked against its CV before any of its bytes is
/// handed on. A mismatch, a read error or a file shorter than its size is an error, and every
/// later read fails the same way.
pub struct VerifiedReader<R> {
    inner: R,
    verifier: ChunkVerifier,
    next: u64,
    buf: Vec<u8>,
    pos: usize,
    handed_on: u64,
    failed: Option<ChunkMismatch>,
}

impl<R: Read> VerifiedReader<R> {
    pub fn new(inner: R, verifier: ChunkVerifier) -> VerifiedReader<R> {
        VerifiedReader { inner, verifier, next: 0, buf: Vec::new(), pos: 0, handed_on: 0, failed: None }
    }

    /// The group that failed its check, if one did.
    pub fn mismatch(&self) -> Option<&ChunkMismatch> {
        self.failed.as_ref()
    }

    /// Bytes handed on so far (all of them checked).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn handed_on(&self) -> u64 {
        self.handed_on
    }

    /// The next group, checked, handed on whole (none at the end): what `read` would hand out
    /// piece by piece, without copying it again. Not to be mixed with `read` mid-group.
    pub fn next_group(&mut self) -> std::io::Result<Option<&[u8]>> {
        if let Some(m) = &self.failed {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, m.clone()));
        }
        if self.next >= self.verifier.groups() {
            return Ok(None);
        }
        self.fill()?;
        self.pos = self.buf.len();
        self.handed_on += self.buf.len() as u64;
        Ok(Some(&self.buf))
    }

    /// The group [`VerifiedReader::next_group`] handed on last (checked).
    pub fn current(&self) -> &[u8] {
        &self.buf
    }

    /// The next group, checked, into `out` (at least [`GROUP`] bytes): its length, or none at
    /// the end. For a caller that keeps several groups of its own at once.
    pub fn next_group_into(&mut self, out: &mut [u8]) -> std::io::Result<Option<usize>> {
        if let Some(m) = &self.failed {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, m.clone()));
        }
        if self.next >= self.verifier.groups() {
            return Ok(None);
        }
        let len = self.verifier.group_len(self.next);
        self.read_group(&mut out[..len])?;
        self.handed_on += len as u64;
        Ok(Some(len))
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let len = self.verifier.group_len(self.next);
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(len, 0);
        self.pos = 0;
        let r = self.read_group(&mut buf);
        if r.is_ok() {
            self.buf = buf;
        }
        r
    }

    /// Reads group `next` into `out` (its length) and checks it.
    fn read_group(&mut self, out: &mut [u8]) -> std::io::Result<()> {
        let mut got = 0;
        while got < out.len() {
            match self.inner.read(&mut out[got..]) {
                Ok(0) => {
                    let offset = self.next * GROUP as u64 + got as u64;
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("it ends at byte {offset}, the manifest says {} bytes", self.verifier.size()),
                    ));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if let Err(m) = self.verifier.verify(self.next, out) {
            self.failed = Some(m.clone());
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, m));
        }
        self.next += 1;
        Ok(())
    }
}

impl<R: Read> Read for VerifiedReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if let Some(m) = &self.failed {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, m.clone()));
        }
        if self.pos == self.buf.len() {
            // An empty file is one empty group, checked like any other.
            if self.next >= self.verifier.groups() {
                return Ok(0);
            }
            self.fill()?;
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.handed_on += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u64).wrapping_mul(2654435761).wrapping_add(seed as u64).to_le_bytes()[3]).collect()
    }

    fn hashed(bytes: &[u8], splits: &[usize]) -> (blake3::Hash, Vec<Cv>) {
        let mut h = ChunkHasher::new();
        let mut rest = bytes;
        for &s in splits {
            let s = s.min(rest.len());
            h.update(&rest[..s]);
            rest = &rest[s..];
        }
        h.update(rest);
        h.finalize()
    }

    const M: usize = GROUP;

    #[test]
    fn the_root_from_the_cvs_is_blake3_at_the_edges() {
        for len in [0, 1, 1023, 1024, 1025, M - 1, M, M + 1, 2 * M - 1, 2 * M, 2 * M + 1, 3 * M, 5 * M + 17, 8 * M] {
            let bytes = data(len, 1);
            let (root, cvs) = hashed(&bytes, &[]);
            assert_eq!(root, blake3::hash(&bytes), "{len} bytes");
            assert_eq!(cvs.len() as u64, if len > M { groups(len as u64) } else { 0 }, "{len} bytes");
            let v = ChunkVerifier::new(root, len as u64, cvs).unwrap();
            for g in 0..v.groups() {
                let start = g as usize * M;
                v.verify(g, &bytes[start..start + v.group_len(g)]).unwrap();
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn any_write_sizes_give_blake3(len in 0usize..(4 * M + 3000), splits in prop::collection::vec(0usize..(M + 5000), 0..12), seed: u8) {
            let bytes = data(len, seed);
            let (root, cvs) = hashed(&bytes, &splits);
            prop_assert_eq!(root, blake3::hash(&bytes));
            prop_assert!(ChunkVerifier::new(root, len as u64, cvs).is_ok());
        }

        #[test]
        fn a_flipped_byte_is_caught_by_its_group(len in 1usize..(4 * M + 3000), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = data(len, 7);
            let (root, cvs) = hashed(&bytes, &[]);
            let v = ChunkVerifier::new(root, len as u64, cvs).unwrap();
            let at = at.index(len);
            bytes[at] ^= 1 << bit;
            for g in 0..v.groups() {
                let start = g as usize * M;
                let r = v.verify(g, &bytes[start..start + v.group_len(g)]);
                if g as usize == at / M {
                    let m = r.unwrap_err();
                    prop_assert_eq!(m.offset, (at / M * M) as u64);
                } else {
                    prop_assert!(r.is_ok());
                }
            }
        }
    }

    #[test]
    fn cvs_that_do_not_merge_to_the_root_are_refused() {
        let bytes = data(3 * M + 5, 3);
        let (root, cvs) = hashed(&bytes, &[]);
        let mut bad = cvs.clone();
        bad[1][0] ^= 1;
        assert!(ChunkVerifier::new(root, bytes.len() as u64, bad).is_err());
        assert!(ChunkVerifier::new(root, bytes.len() as u64, cvs[..3].to_vec()).is_err(), "one missing");
        assert!(ChunkVerifier::new(root, 5 * M as u64, cvs.clone()).is_err(), "another number of groups");
        // The same groups, one byte longer: the CVs still add up, and the last group fails.
        let longer = ChunkVerifier::new(root, bytes.len() as u64 + 1, cvs.clone()).unwrap();
        let mut last = bytes[3 * M..].to_vec();
        last.push(0);
        assert!(longer.verify(3, &last).is_err());
        assert_eq!(decode(&encode(&cvs)).unwrap(), cvs);
        let mut sidecar = encode(&cvs);
        sidecar.pop();
        assert!(decode(&sidecar).is_err());
        assert!(decode(b"not one").is_err());
    }

    fn image(dir: &Path, name: &str, bytes: &[u8]) -> ImageFile {
        std::fs::create_dir_all(dir.join("images")).unwrap();
        std::fs::write(dir.join("images").join(name), bytes).unwrap();
        ImageFile {
            path: format!("images/{name}"),
            size: bytes.len() as u64,
            hash: blake3::hash(bytes).to_hex().to_string(),
        }
    }

    #[test]
    fn a_missing_or_damaged_sidecar_is_computed_again_and_damage_is_still_found() {
        let d = tempfile::tempdir().unwrap();
        let bytes = data(2 * M + 100, 9);
        let img = image(d.path(), "pages-1.img", &bytes);
        let (_, why) = verifier(d.path(), &img).unwrap();
        assert!(why.unwrap().contains("missing"));
        let (_, cvs) = hashed(&bytes, &[]);
        write_sidecars(d.path(), &[(img.path.clone(), cvs.clone())]).unwrap();
        let (v, why) = verifier(d.path(), &img).unwrap();
        assert_eq!(why, None, "the sidecar is used");
        let read: Vec<u8> = {
            let mut out = Vec::new();
            VerifiedReader::new(std::fs::File::open(d.path().join(&img.path)).unwrap(), v)
                .read_to_end(&mut out)
                .unwrap();
            out
        };
        assert_eq!(read, bytes);
        let (v, _) = verifier(d.path(), &img).unwrap();
        let mut groups = VerifiedReader::new(std::fs::File::open(d.path().join(&img.path)).unwrap(), v);
        let mut whole = Vec::new();
        while let Some(g) = groups.next_group().unwrap() {
            whole.extend_from_slice(g);
        }
        assert_eq!(whole, bytes, "group by group, the same bytes");
        let side = sidecar_path(d.path(), &img.path).unwrap();
        let mut damaged = std::fs::read(&side).unwrap();
        damaged[HEADER + 40] ^= 1;
        std::fs::write(&side, &damaged).unwrap();
        let (v, why) = verifier(d.path(), &img).unwrap();
        assert!(why.unwrap().contains("damaged"));
        // The file itself damaged: the fallback read finds it; with good CVs the reader does.
        let mut flipped = bytes.clone();
        flipped[M + 5] ^= 0x40;
        std::fs::write(d.path().join(&img.path), &flipped).unwrap();
        assert!(matches!(verifier(d.path(), &img), Err(ChunkError::Checksum)));
        let mut r = VerifiedReader::new(flipped.as_slice(), v);
        let err = std::io::copy(&mut r, &mut std::io::sink()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(r.mismatch().unwrap().offset, M as u64);
        assert_eq!(r.handed_on(), M as u64, "only the first group was handed on");
    }

    #[test]
    fn a_short_file_is_an_error_not_an_end() {
        let bytes = data(M + 10, 1);
        let (root, cvs) = hashed(&bytes, &[]);
        let v = ChunkVerifier::new(root, bytes.len() as u64, cvs).unwrap();
        let mut r = VerifiedReader::new(&bytes[..M + 5], v);
        let err = std::io::copy(&mut r, &mut std::io::sink()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
