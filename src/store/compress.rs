//! Compression at rest (`compression: zstd`): a checkpoint's memory pages (`pages-N.img`, nearly
//! all of its bytes) are stored as `pages-N.img.zst`, compressed on every CPU before the
//! checkpoint is made durable, so the checksums cover what is on disk. CRIU reads plain images:
//! a restore first writes them into a private directory beside the checkpoint.

use super::StoreError;
use std::fs;
use std::path::{Path, PathBuf};

pub const SUFFIX: &str = ".zst";

pub(crate) fn is_pages(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// Replaces every `pages-*.img` under `images` with its zstd-compressed `.zst`.
pub fn compress_pages(images: &Path, level: i32) -> Result<(), StoreError> {
    for e in fs::read_dir(images).map_err(|source| StoreError::Read { path: images.to_path_buf(), source })? {
        let e = e.map_err(|source| StoreError::Read { path: images.to_path_buf(), source })?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_pages(&name) {
            continue;
        }
        let from = e.path();
        let to = images.join(format!("{name}{SUFFIX}"));
        let write = |source| StoreError::Write { path: to.clone(), source };
        let mut input = fs::File::open(&from).map_err(|source| StoreError::Read { path: from.clone(), source })?;
        let out = fs::File::create(&to).map_err(write)?;
        // Frames a lazy restore can decode one at a time (store::frames).
        let mut z = super::frames::FramedEncoder::new(std::io::BufWriter::with_capacity(1 << 20, out), level);
        std::io::copy(&mut input, &mut z).map_err(write)?;
        z.finish().map_err(write)?.into_inner().map_err(|e| write(e.into_error()))?;
        fs::remove_file(&from).map_err(|source| StoreError::Write { path: from.clone(), source })?;
    }
    Ok(())
}

/// What a stored image is: `pages-1.img.zst.enc` is `pages-1.img`, compressed, then sealed
/// as `pages-1.img.zst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredName {
    /// The name CRIU knows it by.
    pub plain: String,
    /// The name bound into its sealed chunks, when it is sealed.
    pub sealed_as: Option<String>,
    pub compressed: bool,
}

impl StoredName {
    pub fn of(stored: &str) -> StoredName {
        let (base, sealed_as) = match stored.strip_suffix(super::seal::SUFFIX) {
            Some(b) => (b, Some(b.to_string())),
            None => (stored, None),
        };
        match base.strip_suffix(SUFFIX) {
            Some(raw) if is_pages(raw) => StoredName { plain: raw.to_string(), sealed_as, compressed: true },
            _ => StoredName { plain: base.to_string(), sealed_as, compressed: false },
        }
    }
}

/// A directory of plain images for CRIU to restore from, removed when dropped: sealed images
/// decrypted into it, compressed pages decompressed, every other image hard-linked. Plaintext of
/// a sealed checkpoint goes to RAM (`/dev/shm`), never to the disk the checkpoint is on.
pub struct PlainImages {
    pub dir: PathBuf,
}

impl PlainImages {
    pub fn new(
        checkpoint_dir: &Path,
        images: &Path,
        key: Option<&super::seal::Key>,
    ) -> Result<PlainImages, StoreError> {
        let dir = match key {
            Some(_) => {
                let nanos =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
                Path::new("/dev/shm").join(format!("stasis-restore-{}-{nanos}", std::process::id()))
            }
            None => checkpoint_dir.join(".restore-images"),
        };
        let _ = fs::remove_dir_all(&dir);
        super::durable::create_dir_with_mode(&dir, 0o700)?;
        let plain = PlainImages { dir };
        for e in fs::read_dir(images).map_err(|source| StoreError::Read { path: images.to_path_buf(), source })? {
            let e = e.map_err(|source| StoreError::Read { path: images.to_path_buf(), source })?;
            let name = e.file_name().to_string_lossy().into_owned();
            let StoredName { plain: raw, sealed_as, compressed } = StoredName::of(&name);
            let (base, sealed) = match sealed_as {
                Some(b) => (b, true),
                None => (name.clone(), false),
            };
            let to = plain.dir.join(&raw);
            let write = |source| StoreError::Write { path: to.clone(), source };
            let read = |source| StoreError::Read { path: e.path(), source };
            if !sealed && !compressed {
                fs::hard_link(e.path(), &to).map_err(write)?;
                continue;
            }
            let input = std::io::BufReader::with_capacity(1 << 20, fs::File::open(e.path()).map_err(read)?);
            let out = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(&to).map_err(write)?);
            let mut sink: Box<dyn std::io::Write> = if compressed {
                Box::new(zstd::stream::write::Decoder::new(out).map_err(write)?)
            } else {
                Box::new(out)
            };
            if sealed {
                let key = key.ok_or_else(|| read(std::io::Error::other("it is encrypted and no key was given")))?;
                super::seal::open(input, &mut sink, &base, key)
                    .map_err(|err| read(std::io::Error::other(err.to_string())))?;
            } else {
                // The sink decompresses.
                let mut input = input;
                std::io::copy(&mut input, &mut sink).map_err(read)?;
            }
            sink.flush().map_err(write)?;
        }
        Ok(plain)
    }
}

impl Drop for PlainImages {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_say_what_was_done_to_them() {
        let n = StoredName::of("pages-1.img.zst.enc");
        assert_eq!(
            (n.plain.as_str(), n.sealed_as.as_deref(), n.compressed),
            ("pages-1.img", Some("pages-1.img.zst"), true)
        );
        assert_eq!(
            StoredName::of("core-1.img"),
            StoredName { plain: "core-1.img".into(), sealed_as: None, compressed: false }
        );
        assert!(!StoredName::of("core-1.img.zst").compressed, "only pages are compressed");
        assert_eq!(StoredName::of("core-1.img.enc").sealed_as.as_deref(), Some("core-1.img"));
    }

    #[test]
    fn pages_round_trip_and_other_images_stay_as_they_are() {
        let d = tempfile::tempdir().unwrap();
        let images = d.path().join("images");
        fs::create_dir(&images).unwrap();
        let pages: Vec<u8> = (0..3 << 20).map(|i| (i / 4096 % 7) as u8).collect();
        fs::write(images.join("pages-1.img"), &pages).unwrap();
        fs::write(images.join("core-1.img"), b"core").unwrap();
        compress_pages(&images, 3).unwrap();
        assert!(!images.join("pages-1.img").exists());
        let z = fs::metadata(images.join("pages-1.img.zst")).unwrap().len();
        assert!(z < pages.len() as u64 / 10, "repetitive pages compress: {z}");
        let plain = PlainImages::new(d.path(), &images, None).unwrap();
        assert_eq!(fs::read(plain.dir.join("pages-1.img")).unwrap(), pages);
        assert_eq!(fs::read(plain.dir.join("core-1.img")).unwrap(), b"core");
        let dir = plain.dir.clone();
        drop(plain);
        assert!(!dir.exists(), "removed after the restore");
    }
}
