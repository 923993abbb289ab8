//! A stored image's plain bytes read at any offset (a lazy restore's page server, criu::lazy),
//! every byte checked before it is handed out: each 1 MiB group of stored bytes against its
//! chunk hash, a sealed chunk by its tag (opened alone: store::seal), a compressed image one
//! frame at a time through its seek table (store::frames). A compressed image without a seek
//! table (a checkpoint from before them) cannot be read this way: [`RandomImage::open`] says so
//! and the caller decodes it front to back.

use super::chunks::{self, ChunkVerifier};
use super::frames::{self, SeekTable};
use super::seal::{self, SealedChunks};
use super::verify::ImageProblem;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// Pieces kept of each layer (checked groups, opened chunks, decoded frames), newest first: a
/// fault elsewhere does not make the background push read, check and decode its piece again.
const RECENT: usize = 4;

/// The last few pieces of one layer, by index.
#[derive(Default)]
struct Recent(Mutex<Vec<(u64, Arc<Vec<u8>>)>>);

impl Recent {
    fn get_or<E>(&self, index: u64, load: impl FnOnce() -> Result<Vec<u8>, E>) -> Result<Arc<Vec<u8>>, E> {
        let mut recent = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = recent.iter().position(|(at, _)| *at == index) {
            let hit = recent.remove(i);
            recent.insert(0, hit.clone());
            return Ok(hit.1);
        }
        let piece = Arc::new(load()?);
        recent.truncate(RECENT - 1);
        recent.insert(0, (index, piece.clone()));
        Ok(piece)
    }
}

/// One stored image, read anywhere.
pub struct RandomImage {
    file: std::fs::File,
    verifier: ChunkVerifier,
    path: String,
    sealed: Option<SealedChunks>,
    frames: Option<SeekTable>,
    groups: Recent,
    opened: Recent,
    decoded: Recent,
}

impl RandomImage {
    /// `path` names the image in errors; `sealed_as` is the name its sealed chunks are bound to
    /// (None: not sealed). Ok(None): compressed without a seek table.
    pub fn open(
        file: std::fs::File,
        verifier: ChunkVerifier,
        path: &str,
        sealed_as: Option<&str>,
        compressed: bool,
        key: Option<&seal::Key>,
    ) -> Result<Option<RandomImage>, ImageProblem> {
        let mut image = RandomImage {
            file,
            verifier,
            path: path.to_string(),
            sealed: None,
            frames: None,
            groups: Recent::default(),
            opened: Recent::default(),
            decoded: Recent::default(),
        };
        if let Some(name) = sealed_as {
            let key = key.ok_or_else(|| image.undecodable("it is encrypted and no key was given"))?;
            let mut head = [0u8; seal::HEAD];
            image.stored_at(0, &mut head)?;
            let sealed = SealedChunks::new(&head, image.verifier.size(), name, key)
                .map_err(|e| image.undecodable(&e.to_string()))?;
            image.sealed = Some(sealed);
        }
        if compressed {
            let len = image.opened_len();
            let mut last = [0u8; 4];
            if len < 4 {
                return Ok(None);
            }
            image.opened_at(len - 4, &mut last)?;
            let tail_len = SeekTable::tail_len(last);
            if tail_len > len || tail_len > 64 << 20 {
                return Ok(None);
            }
            let mut tail = vec![0u8; tail_len as usize];
            image.opened_at(len - tail_len, &mut tail)?;
            match SeekTable::parse(&tail, len) {
                Some(t) => image.frames = Some(t),
                None => return Ok(None),
            }
        }
        Ok(Some(image))
    }

    fn undecodable(&self, error: &str) -> ImageProblem {
        ImageProblem::Undecodable { path: self.path.clone(), error: error.to_string() }
    }

    /// The plain bytes at `offset`, checked, opened and decoded.
    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<(), ImageProblem> {
        let Some(table) = &self.frames else { return self.opened_at(offset, out) };
        pieces(offset, out, frames::FRAME as u64, |i| {
            if i as usize >= table.frames() {
                return Err(self.undecodable(&format!("plain bytes in frame {i} are past its end")));
            }
            self.decoded.get_or(i, || {
                let r = table.range(i as usize);
                let mut compressed = vec![0u8; (r.end - r.start) as usize];
                self.opened_at(r.start, &mut compressed)?;
                frames::decode_frame(&compressed).map_err(|e| self.undecodable(&format!("frame {i}: {e}")))
            })
        })
        .map_err(|e| e.unwrap_or_else(|at| self.undecodable(&format!("plain bytes at {at} are past its end"))))
    }

    /// The length of what the seal opens to (the stored length when not sealed).
    fn opened_len(&self) -> u64 {
        self.sealed.as_ref().map_or(self.verifier.size(), SealedChunks::plain_len)
    }

    /// Bytes of what the seal opens to (the stored bytes when not sealed).
    fn opened_at(&self, offset: u64, out: &mut [u8]) -> Result<(), ImageProblem> {
        let Some(sealed) = &self.sealed else { return self.stored_at(offset, out) };
        pieces(offset, out, seal::CHUNK as u64, |i| {
            if i >= sealed.chunks() {
                return Err(self.undecodable(&format!("sealed chunk {i} is past its end")));
            }
            self.opened.get_or(i, || {
                let r = sealed.range(i);
                let mut bytes = vec![0u8; (r.end - r.start) as usize];
                self.stored_at(r.start, &mut bytes)?;
                sealed.open(i, &bytes).map_err(|e| self.undecodable(&format!("chunk {i}: {e}")))
            })
        })
        .map_err(|e| e.unwrap_or_else(|at| self.undecodable(&format!("bytes at {at} are past its end"))))
    }

    /// Stored bytes, each group checked against its chunk hash first.
    fn stored_at(&self, offset: u64, out: &mut [u8]) -> Result<(), ImageProblem> {
        pieces(offset, out, chunks::GROUP as u64, |group| {
            if group >= self.verifier.groups() {
                return Err(self.undecodable(&format!("stored group {group} is past its end")));
            }
            self.groups.get_or(group, || {
                let mut bytes = vec![0u8; self.verifier.group_len(group)];
                self.file
                    .read_exact_at(&mut bytes, group * chunks::GROUP as u64)
                    .map_err(|e| ImageProblem::Unreadable { path: self.path.clone(), error: e.to_string() })?;
                self.verifier
                    .verify(group, &bytes)
                    .map_err(|at| ImageProblem::ChunkChecksum { path: self.path.clone(), at })?;
                Ok(bytes)
            })
        })
        .map_err(|e| e.unwrap_or_else(|at| self.undecodable(&format!("stored bytes at {at} are past its end"))))
    }
}

/// Fills `out` with the bytes at `offset` of a layer cut in pieces of `unit` bytes, `piece(i)`
/// giving piece `i`. Err(Ok(problem)) from `piece`, Err(Err(at)) where a piece ends too soon.
fn pieces(
    offset: u64,
    out: &mut [u8],
    unit: u64,
    mut piece: impl FnMut(u64) -> Result<Arc<Vec<u8>>, ImageProblem>,
) -> Result<(), Result<ImageProblem, u64>> {
    let mut done = 0usize;
    while done < out.len() {
        let at = offset + done as u64;
        let i = at / unit;
        let bytes = piece(i).map_err(Ok)?;
        let from = (at - i * unit) as usize;
        let n = bytes.len().saturating_sub(from).min(out.len() - done);
        if n == 0 {
            return Err(Err(at));
        }
        out[done..done + n].copy_from_slice(&bytes[from..from + n]);
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::stored::{StoredWriter, Transform};

    fn pages(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i / 4096) as u8).wrapping_mul(13) ^ (i % 251) as u8).collect()
    }

    /// `data` stored as `pages-1.img` the way a dump stores it, opened for reading anywhere.
    fn stored(t: &Transform<'_>, data: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, ChunkVerifier, String) {
        let d = tempfile::tempdir().unwrap();
        let mut w = StoredWriter::create(d.path(), "pages-1.img", t).unwrap();
        for piece in data.chunks(200_003) {
            w.write_all(piece).unwrap();
        }
        let s = w.finish().unwrap();
        let path = d.path().join(s.file.path.trim_start_matches("images/"));
        let root = blake3::Hash::from_hex(&s.file.hash).unwrap();
        let verifier = ChunkVerifier::new(root, s.file.size, s.cvs).unwrap();
        let name = s.file.path.trim_start_matches("images/").to_string();
        (d, path, verifier, name)
    }

    fn open(path: &std::path::Path, v: ChunkVerifier, name: &str, key: Option<&seal::Key>) -> Option<RandomImage> {
        let sealed_as = name.strip_suffix(seal::SUFFIX);
        let compressed = name.contains(crate::store::compress::SUFFIX);
        RandomImage::open(std::fs::File::open(path).unwrap(), v, name, sealed_as, compressed, key).unwrap()
    }

    #[test]
    fn plain_sealed_compressed_or_both_read_anywhere_as_written() {
        let key = seal::Key::from_bytes([5; 32]);
        let data = pages(5 * frames::FRAME + 3 * 4096);
        for t in [
            Transform { compression: None, key: None },
            Transform { compression: None, key: Some(&key) },
            Transform { compression: Some(3), key: None },
            Transform { compression: Some(1), key: Some(&key) },
        ] {
            let (_d, path, v, name) = stored(&t, &data);
            let image = open(&path, v, &name, Some(&key)).expect("read anywhere");
            // Out of order, across frame, chunk and group edges, as faults come.
            for at in
                [4 * frames::FRAME as u64 + 4096, 0, (frames::FRAME - 4096) as u64, 3 * 4096, data.len() as u64 - 4096]
            {
                let mut out = vec![0u8; 8192.min(data.len() - at as usize)];
                image.read_at(at, &mut out).unwrap();
                assert_eq!(out, data[at as usize..at as usize + out.len()], "{name} at {at}");
            }
        }
    }

    #[test]
    fn a_flipped_stored_byte_is_caught_and_an_old_single_stream_is_not_read_anywhere() {
        use std::os::unix::fs::FileExt;
        // Bytes zstd cannot shrink: the first group holds none of the seek table.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..3 * frames::FRAME)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (_d, path, v, name) = stored(&Transform { compression: Some(3), key: None }, &data);
        let f = std::fs::OpenOptions::new().write(true).read(true).open(&path).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 10).unwrap();
        f.write_all_at(&[b[0] ^ 1], 10).unwrap();
        let image = open(&path, v, &name, None).expect("the table is in the last group, intact");
        let mut out = vec![0u8; 4096];
        let e = image.read_at(0, &mut out).unwrap_err();
        assert!(matches!(e, ImageProblem::ChunkChecksum { .. }), "{e}");

        let d = tempfile::tempdir().unwrap();
        let old = d.path().join("pages-1.img.zst");
        std::fs::write(&old, zstd::encode_all(data.as_slice(), 3).unwrap()).unwrap();
        let (size, root, cvs) = chunks::hash_file(&old).unwrap();
        let v = ChunkVerifier::new(root, size, cvs).unwrap();
        assert!(open(&old, v, "pages-1.img.zst", None).is_none(), "decoded front to back instead");
    }
}
