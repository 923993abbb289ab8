//! Checking a checkpoint's image files against its manifest before CRIU ever reads them:
//! missing, extra, truncated or grown, and bit-flipped files are each named.

use super::manifest::ImageFile;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageProblem {
    Missing(String),
    Extra(String),
    Size {
        path: String,
        expected: u64,
        found: u64,
    },
    Checksum(String),
    Unreadable {
        path: String,
        error: String,
    },
    /// A group of the file is not what was hashed into the manifest, found as it was read.
    ChunkChecksum {
        path: String,
        at: super::chunks::ChunkMismatch,
    },
    /// Its bytes are the ones in the manifest, and do not decrypt or decompress.
    Undecodable {
        path: String,
        error: String,
    },
}

impl fmt::Display for ImageProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageProblem::Missing(p) => write!(f, "{p} is missing"),
            ImageProblem::Extra(p) => write!(f, "{p} is not in the manifest"),
            ImageProblem::Size { path, expected, found } => {
                write!(f, "{path} has {found} bytes, the manifest says {expected}")
            }
            ImageProblem::Checksum(p) => write!(f, "{p} does not match its checksum (its content was damaged)"),
            ImageProblem::Unreadable { path, error } => write!(f, "{path} cannot be read ({error})"),
            ImageProblem::ChunkChecksum { path, at } => {
                write!(f, "{path} does not match its checksum in {at} (its content was damaged)")
            }
            ImageProblem::Undecodable { path, error } => {
                write!(f, "{path} matches its checksum but cannot be decrypted or decompressed ({error})")
            }
        }
    }
}

/// Checks every file under `dir/images/` against `expected`. Sizes are checked for all files
/// before any content is read, so a truncated file is reported cheaply.
pub fn verify_images(dir: &Path, expected: &[ImageFile]) -> Result<(), ImageProblem> {
    check_listing(dir, expected)?;
    for f in expected {
        let hash = super::identity::hash_file(&dir.join(&f.path))
            .map_err(|e| ImageProblem::Unreadable { path: f.path.clone(), error: e.to_string() })?;
        if hash != f.hash {
            return Err(ImageProblem::Checksum(f.path.clone()));
        }
    }
    Ok(())
}

/// The part of [`verify_images`] that reads no content: every file there, none extra, each of
/// its size. A restore that checks the content as it reads it checks this first.
pub fn check_listing(dir: &Path, expected: &[ImageFile]) -> Result<(), ImageProblem> {
    let mut on_disk: BTreeMap<String, u64> = BTreeMap::new();
    list(&dir.join("images"), "images", &mut on_disk)
        .map_err(|e| ImageProblem::Unreadable { path: "images".into(), error: e.to_string() })?;
    for f in expected {
        match on_disk.get(&f.path) {
            None => return Err(ImageProblem::Missing(f.path.clone())),
            Some(&found) if found != f.size => {
                return Err(ImageProblem::Size { path: f.path.clone(), expected: f.size, found })
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = on_disk.keys().find(|p| !expected.iter().any(|f| &f.path == *p)) {
        return Err(ImageProblem::Extra(extra.clone()));
    }
    Ok(())
}

fn list(dir: &Path, rel: &str, out: &mut BTreeMap<String, u64>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = format!("{rel}/{}", entry.file_name().to_string_lossy());
        let meta = entry.metadata()?;
        if meta.is_dir() {
            list(&entry.path(), &name, out)?;
        } else {
            out.insert(name, meta.len());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Vec<ImageFile>) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("images")).unwrap();
        let mut files = Vec::new();
        for (name, content) in [("core-1.img", vec![7u8; 40]), ("pages-1.img", vec![1u8; 4096])] {
            std::fs::write(d.path().join("images").join(name), &content).unwrap();
            files.push(ImageFile {
                path: format!("images/{name}"),
                size: content.len() as u64,
                hash: blake3::hash(&content).to_hex().to_string(),
            });
        }
        (d, files)
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        let (d, files) = setup();
        let img = |n: &str| d.path().join("images").join(n);
        assert_eq!(verify_images(d.path(), &files), Ok(()));

        let mut bytes = std::fs::read(img("pages-1.img")).unwrap();
        bytes[2000] ^= 0x10;
        std::fs::write(img("pages-1.img"), &bytes).unwrap();
        assert_eq!(verify_images(d.path(), &files), Err(ImageProblem::Checksum("images/pages-1.img".into())));

        bytes.pop();
        std::fs::write(img("pages-1.img"), &bytes).unwrap();
        assert!(matches!(verify_images(d.path(), &files), Err(ImageProblem::Size { found: 4095, .. })));

        std::fs::remove_file(img("pages-1.img")).unwrap();
        assert_eq!(verify_images(d.path(), &files), Err(ImageProblem::Missing("images/pages-1.img".into())));

        let (d, files) = setup();
        std::fs::write(d.path().join("images/extra.img"), b"x").unwrap();
        assert_eq!(verify_images(d.path(), &files), Err(ImageProblem::Extra("images/extra.img".into())));
    }
}
