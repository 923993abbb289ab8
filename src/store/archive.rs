//! One checkpoint as one self-describing, streamable archive (`stasis export` / `import`): a
//! tar stream in a zstd frame with its content checksum. In order: `stasis-export.json` (what
//! it is, and the BLAKE3 of the manifest), `manifest.json` (which holds the BLAKE3 and size of
//! every image), then the images in the manifest's order. Written in one pass and read in one
//! pass, so it goes through a pipe (`export -o - | ssh host stasis import -`).
//!
//! Reading trusts nothing: the archive may come from another host or a stranger. Entries must
//! come in that order, be regular files with plain names under `images/`, each listed exactly
//! once with its size, and hash to what the manifest says; the manifest must hash to what the
//! header says. Anything else refuses the archive before a byte reaches CRIU.

use super::manifest::{ImageFile, Manifest};
use super::Checkpoint;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Component, Path};

pub const HEADER_NAME: &str = "stasis-export.json";
const MANIFEST_NAME: &str = "manifest.json";
const FORMAT: u32 = 1;
const MAX_HEADER: u64 = 64 << 10;
const MAX_MANIFEST: u64 = 16 << 20;
/// PATH_MAX: no name `export` writes is longer.
const MAX_NAME: u64 = 4096;
/// zstd level for export: fast, multi-threaded; images are mostly memory pages.
const LEVEL: i32 = 3;

/// The first entry of an archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: u32,
    /// The service the checkpoint is of.
    pub service: String,
    /// Its id on the exporting host.
    pub checkpoint: String,
    /// BLAKE3 (hex) of `manifest.json` as stored in the archive.
    pub manifest_blake3: String,
    pub stasis_version: String,
    pub exported_at: String,
}

/// Why an archive was refused (the text reads after "failed to import: ").
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the archive is not a stasis export: {0}")]
    NotAnExport(String),
    #[error("the archive is damaged: {0}")]
    Damaged(String),
    #[error("failed to write {path}: {source}")]
    Write { path: std::path::PathBuf, source: std::io::Error },
}

/// Writes `cp` as an archive to `out`; returns the bytes of checkpoint data written.
pub fn write(cp: &Checkpoint, out: impl Write) -> std::io::Result<u64> {
    let manifest = std::fs::read(cp.dir.join(MANIFEST_NAME))?;
    let header = Header {
        format: FORMAT,
        service: cp.manifest.service.clone(),
        checkpoint: cp.id.clone(),
        manifest_blake3: blake3::hash(&manifest).to_hex().to_string(),
        stasis_version: env!("CARGO_PKG_VERSION").to_string(),
        exported_at: crate::time_fmt::rfc3339_utc(std::time::SystemTime::now()),
    };
    let mut z = zstd::stream::Encoder::new(out, LEVEL)?;
    z.include_checksum(true)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    z.multithread(threads)?;
    let mut tar = tar::Builder::new(z);
    let mut bytes = 0u64;
    let add = |tar: &mut tar::Builder<_>, name: &str, size: u64, data: &mut dyn Read| -> std::io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(size);
        h.set_mode(0o600);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mtime(0);
        tar.append_data(&mut h, name, data)
    };
    let head = serde_json::to_vec_pretty(&header).expect("header serializes");
    add(&mut tar, HEADER_NAME, head.len() as u64, &mut head.as_slice())?;
    add(&mut tar, MANIFEST_NAME, manifest.len() as u64, &mut manifest.as_slice())?;
    for img in cp.manifest.images.as_deref().unwrap_or_default() {
        let path = cp.dir.join(&img.path);
        let f = std::fs::File::open(&path)?;
        // Exactly the size the manifest has: a file that changed is not exported as if intact.
        let mut limited = f.take(img.size);
        add(&mut tar, &img.path, img.size, &mut limited)?;
        bytes += img.size;
    }
    tar.into_inner()?.finish()?.flush()?;
    Ok(bytes)
}

/// What reading an archive gives: its header and manifest, the images written under `dir` (and
/// their chunk hashes under `dir/chunks`).
pub struct Imported {
    pub header: Header,
    pub manifest: Manifest,
}

/// Reads an archive from `input`, writing its images under `dir` (which must hold an empty
/// `images/`). Every check of the module doc is made; on Err, `dir` may hold partial files.
pub fn read(input: impl Read, dir: &Path) -> Result<Imported, ArchiveError> {
    let z = zstd::stream::Decoder::new(input).map_err(|e| ArchiveError::NotAnExport(format!("not zstd: {e}")))?;
    let mut tar = tar::Archive::new(z);
    // Raw: the tar crate would otherwise read a GNU long name or pax member into memory whole,
    // whatever size it claims (a few KiB of zstd can claim GiBs). `export` writes none, so each
    // is just a member of the wrong type or name here, refused below.
    let mut entries = tar.entries().map_err(|e| ArchiveError::Damaged(e.to_string()))?.raw(true);
    let header = read_header(&mut entries)?;
    let manifest = read_manifest(&mut entries, &header)?;
    let images = listed_images(&manifest)?;
    let mut sidecars = Vec::new();
    for img in &images {
        sidecars.push((img.path.clone(), read_image(&mut entries, dir, img)?));
    }
    super::chunks::write_sidecars(dir, &sidecars).map_err(|e| ArchiveError::Write {
        path: dir.join(super::chunks::DIR),
        source: std::io::Error::other(e.to_string()),
    })?;
    match entries.next() {
        None => {}
        Some(Ok(e)) => {
            let name = entry_name(&e).unwrap_or_default();
            return Err(ArchiveError::Damaged(format!("it holds {name:?}, which the manifest does not list")));
        }
        Some(Err(e)) => return Err(ArchiveError::Damaged(e.to_string())),
    }
    // The zstd frame's checksum is checked at its end: read to it.
    let mut rest = tar.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(|e| ArchiveError::Damaged(format!("its end: {e}")))?;
    Ok(Imported { header, manifest })
}

/// The next member and its name. A name over 100 bytes (an shm copy's can be) comes in a GNU
/// long-name member before it, as tar::Builder writes it: read here, with a bound.
fn next_member<'a, R: Read>(
    entries: &mut tar::Entries<'a, R>,
    what: &str,
) -> Result<(tar::Entry<'a, R>, String), ArchiveError> {
    let mut long_name = None;
    loop {
        let e = match entries.next() {
            Some(Ok(e)) => e,
            Some(Err(e)) => return Err(ArchiveError::Damaged(format!("{e} (reading {what})"))),
            None => return Err(ArchiveError::Damaged(format!("it ends before {what}"))),
        };
        if long_name.is_none() && e.header().entry_type().is_gnu_longname() {
            let bytes = read_small(e, MAX_NAME, "a long name")?;
            let name = bytes.split(|b| *b == 0).next().unwrap_or_default();
            long_name = Some(String::from_utf8_lossy(name).into_owned());
            continue;
        }
        let name = match long_name {
            Some(n) => n,
            None => entry_name(&e)?,
        };
        return Ok((e, name));
    }
}

/// The first member, in a format this stasis reads.
fn read_header<R: Read>(entries: &mut tar::Entries<'_, R>) -> Result<Header, ArchiveError> {
    // Not even a zstd frame: some other file, not a damaged export.
    let (e, name) = next_member(entries, HEADER_NAME).map_err(|e| match e {
        ArchiveError::Damaged(m) if m.contains("Unknown frame descriptor") => {
            ArchiveError::NotAnExport("it is not a zstd stream (`stasis export` writes tar in zstd)".into())
        }
        other => other,
    })?;
    if name != HEADER_NAME {
        return Err(ArchiveError::NotAnExport(format!("its first entry is {name:?}, not {HEADER_NAME}")));
    }
    let bytes = read_small(e, MAX_HEADER, HEADER_NAME)?;
    let header: Header =
        serde_json::from_slice(&bytes).map_err(|e| ArchiveError::NotAnExport(format!("{HEADER_NAME}: {e}")))?;
    if header.format != FORMAT {
        return Err(ArchiveError::NotAnExport(format!(
            "export format {} (this stasis reads format {FORMAT}; use a matching version)",
            header.format
        )));
    }
    Ok(header)
}

/// The second member, which must hash to what `header` says.
fn read_manifest<R: Read>(entries: &mut tar::Entries<'_, R>, header: &Header) -> Result<Manifest, ArchiveError> {
    let (e, name) = next_member(entries, MANIFEST_NAME)?;
    if name != MANIFEST_NAME {
        return Err(ArchiveError::Damaged(format!("its second entry is {name:?}, not {MANIFEST_NAME}")));
    }
    let bytes = read_small(e, MAX_MANIFEST, MANIFEST_NAME)?;
    if blake3::hash(&bytes).to_hex().as_str() != header.manifest_blake3 {
        return Err(ArchiveError::Damaged(format!("{MANIFEST_NAME} does not match the checksum in {HEADER_NAME}")));
    }
    Manifest::from_sealed_bytes(&bytes).map_err(|e| ArchiveError::Damaged(format!("{MANIFEST_NAME}: {e}")))
}

/// The manifest's images, each a plain file under `images/` before any is written.
fn listed_images(manifest: &Manifest) -> Result<Vec<ImageFile>, ArchiveError> {
    let images: Vec<ImageFile> =
        manifest.images.clone().ok_or_else(|| ArchiveError::Damaged("the manifest lists no images".into()))?;
    for img in &images {
        if !plain_image_path(&img.path) {
            return Err(ArchiveError::Damaged(format!(
                "the manifest names {:?}, not a plain file under images/",
                img.path
            )));
        }
    }
    Ok(images)
}

/// Writes the next member, which must be `img`, under `dir`; returns its chunk hashes.
fn read_image<R: Read>(
    entries: &mut tar::Entries<'_, R>,
    dir: &Path,
    img: &ImageFile,
) -> Result<Vec<super::chunks::Cv>, ArchiveError> {
    let (e, name) = next_member(entries, &img.path)?;
    if name != img.path {
        return Err(ArchiveError::Damaged(format!("expected {} next, found {name:?}", img.path)));
    }
    if e.header().entry_type() != tar::EntryType::Regular || e.size() != img.size {
        return Err(ArchiveError::Damaged(format!("{} is not a regular file of {} bytes", img.path, img.size)));
    }
    let path = dir.join(&img.path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| ArchiveError::Write { path: path.clone(), source })?;
    // The chunk hashes come with the hash, for the restore to check the image as it reads it.
    let mut hasher = super::chunks::ChunkHasher::new();
    let mut reader = e.take(img.size);
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| ArchiveError::Damaged(format!("{}: {e}", img.path)))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n]).map_err(|source| ArchiveError::Write { path: path.clone(), source })?;
        got += n as u64;
    }
    let (hash, cvs) = hasher.finalize();
    if got != img.size || hash.to_hex().as_str() != img.hash {
        return Err(ArchiveError::Damaged(format!("{} does not match its checksum", img.path)));
    }
    Ok(cvs)
}

fn entry_name<R: Read>(e: &tar::Entry<'_, R>) -> Result<String, ArchiveError> {
    let p = e.path().map_err(|e| ArchiveError::Damaged(format!("an entry name: {e}")))?;
    Ok(p.to_string_lossy().into_owned())
}

fn read_small<R: Read>(e: tar::Entry<'_, R>, max: u64, what: &str) -> Result<Vec<u8>, ArchiveError> {
    if e.size() > max {
        return Err(ArchiveError::Damaged(format!("{what} is {} bytes, more than {max}", e.size())));
    }
    let mut bytes = Vec::new();
    e.take(max).read_to_end(&mut bytes).map_err(|err| ArchiveError::Damaged(format!("{what}: {err}")))?;
    Ok(bytes)
}

/// `images/NAME` with NAME a plain file name: nothing that could climb out of the directory.
fn plain_image_path(p: &str) -> bool {
    let mut c = Path::new(p).components();
    matches!(
        (c.next(), c.next(), c.next()),
        (Some(Component::Normal(a)), Some(Component::Normal(b)), None)
            if a == "images" && !b.to_string_lossy().starts_with('.')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An archive as `write` makes one, of `images` (name under images/, content), with `extra`
    /// (a tar header and its data) put before the manifest.
    fn archive(images: &[(String, Vec<u8>)], extra: Option<(tar::Header, Vec<u8>)>) -> Vec<u8> {
        let hash = |b: &[u8]| blake3::hash(b).to_hex().to_string();
        let listed: Vec<_> =
            images.iter().map(|(p, d)| serde_json::json!({"path": p, "size": d.len(), "hash": hash(d)})).collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "format": 2, "id": "1-x", "generation": 1, "service": "s", "kind": "stop", "created_at": "t",
            "stasis_version": "0", "criu_version": "4", "init_binary": "/i", "stdout_pipe_inode": 1, "size_bytes": 1,
            "images": listed, "hash_algorithm": "blake3", "executables": [], "config_digest": "c", "kernel_version": "k",
        }))
        .unwrap();
        let header = serde_json::to_vec(&serde_json::json!({
            "format": FORMAT, "service": "s", "checkpoint": "1-x", "manifest_blake3": hash(&manifest),
            "stasis_version": "0", "exported_at": "t",
        }))
        .unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        let add = |tar: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, name, data).unwrap();
        };
        add(&mut tar, HEADER_NAME, &header);
        if let Some((h, data)) = extra {
            tar.append(&h, data.as_slice()).unwrap();
        }
        add(&mut tar, MANIFEST_NAME, &manifest);
        for (p, d) in images {
            add(&mut tar, p, d);
        }
        zstd::encode_all(tar.into_inner().unwrap().as_slice(), 1).unwrap()
    }

    #[test]
    fn a_name_over_100_bytes_comes_through_its_long_name_member() {
        let long = format!("images/shm-{}", "n".repeat(200));
        let images = [("images/pages-1.img".to_string(), b"pages".to_vec()), (long.clone(), b"shm".to_vec())];
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("images")).unwrap();
        read(archive(&images, None).as_slice(), d.path()).unwrap();
        assert_eq!(std::fs::read(d.path().join(&long)).unwrap(), b"shm");
    }

    // Found by fuzz_archive_import: a 934-byte archive made the import hold 32 MiB, reading a
    // 16 MiB GNU long-link member whole (as it would 16 GiB).
    #[test]
    fn a_huge_long_name_or_pax_member_is_refused_unread() {
        for kind in [tar::EntryType::GNULongName, tar::EntryType::GNULongLink, tar::EntryType::XHeader] {
            let mut h = tar::Header::new_gnu();
            h.set_path("././@LongLink").unwrap();
            h.set_entry_type(kind);
            h.set_size(16 << 20);
            h.set_cksum();
            let bytes = archive(&[("images/pages-1.img".into(), b"x".to_vec())], Some((h, vec![b'a'; 16 << 20])));
            assert!(bytes.len() < 4096, "{} bytes", bytes.len());
            let d = tempfile::tempdir().unwrap();
            std::fs::create_dir(d.path().join("images")).unwrap();
            let (result, peak) = crate::fuzz::peak_heap(|| read(bytes.as_slice(), d.path()));
            assert!(result.is_err(), "{kind:?}");
            assert!(peak < 4 << 20, "{kind:?}: {peak} bytes of heap");
        }
    }

    #[test]
    fn image_paths_cannot_climb_out() {
        assert!(plain_image_path("images/pages-1.img"));
        for bad in [
            "images/../../etc/passwd",
            "/etc/passwd",
            "images",
            "images/a/b",
            "x/pages-1.img",
            "images/.hidden",
            "images/..",
        ] {
            assert!(!plain_image_path(bad), "{bad}");
        }
    }
}
