//! Incremental checkpoints as chains. An incremental checkpoint (`parent` in its manifest) holds
//! only the pages written since its parent; its pagemaps mark every other run `PE_PARENT`. A
//! pre-copy stop (`pre_copy`) holds its pre-dump inside itself, as the layer under its own
//! images. This module owns the chain: resolving it (each parent must be in the store and be
//! the checkpoint the child was taken against: [`crate::store::Manifest::content_hash`]),
//! verifying every link, naming the damaged one, the ancestors retention must keep, and the
//! flat images a restore gives CRIU.
//!
//! Why a restore flattens instead of handing CRIU the directories with `parent` links: CRIU
//! cannot read a parent through stasis's image streamer (criu/pagemap.c refuses incremental
//! images when streaming), a compressed link's pages would have to be written out plain anyway,
//! and a link could change between the check and CRIU's read of it. Flattening
//! ([`flatten_verified`]) checks every link's listing and small images first, then reads each
//! pages file it needs once, from start to end, hashing the stored bytes as they are read (a
//! mismatch names the link), and writes one plain `pagemap-N.img` + `pages-N.img` per process,
//! what a full dump would have written: CRIU restores it as it restores any checkpoint, and only
//! once every byte it is given checked out. The cost is one write of the memory at restore
//! time (as for a compressed checkpoint with a CRIU that cannot be served its images,
//! store::compress::PlainImages).

use super::compress::{PlainImages, StoredName};
use super::images::{pagemap_runs, PAGE, PE_LAZY, PE_PARENT, PE_PRESENT};
use super::manifest::{ImageFile, IMAGES_DIR};
use super::verify::ImageProblem;
use super::{Checkpoint, CheckpointStore, ListedCheckpoint};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// No chain is longer than this (`full_every` is at most 1000); a longer one is a loop.
const MAX_LINKS: usize = 1002;
/// The pre-copy layer's directory inside a checkpoint.
pub const PRE_DUMP_DIR: &str = "pre-dump";

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("failed to find its parent checkpoint {parent} in the store (deleted or quarantined); checkpoint {child} holds only the pages written since it")]
    MissingParent { child: String, parent: String },
    #[error("failed to read its parent checkpoint {parent}: its manifest is damaged ({why})")]
    DamagedParentManifest { parent: String, why: String },
    #[error("failed to use its parent checkpoint {parent}: it is not the checkpoint {child} was taken against (content hash {found}, recorded {recorded})")]
    ReplacedParent { child: String, parent: String, recorded: String, found: String },
    #[error("failed to resolve the chain of checkpoint {0}: it has more than {MAX_LINKS} links (a loop)")]
    Loop(String),
    #[error("failed to verify checkpoint {id} of the chain: {problem}")]
    Damaged { id: String, problem: ImageProblem },
    #[error("failed to read the chain of checkpoint {id}: it is sealed (incremental checkpoints are never encrypted)")]
    Sealed { id: String },
    #[error("failed to flatten {path}: {why}")]
    Flatten { path: String, why: String },
}

impl ChainError {
    /// The link found damaged, when the damage is in one (to be quarantined).
    pub fn damaged_link(&self) -> Option<&str> {
        match self {
            ChainError::Damaged { id, .. } => Some(id),
            ChainError::DamagedParentManifest { parent, .. } => Some(parent),
            _ => None,
        }
    }
}

/// Whether a restore of `cp` needs more than its own pages: a parent or a pre-copy layer.
pub fn is_layered(cp: &Checkpoint) -> bool {
    cp.manifest.parent.is_some() || cp.manifest.pre_copy.is_some()
}

/// `cp`, then its parent, and so on to the full checkpoint at the root; each parent checked
/// to be the one its child was taken against. Reads manifests only.
pub fn resolve(store: &CheckpointStore, cp: &Checkpoint) -> Result<Vec<Checkpoint>, ChainError> {
    resolve_in(&store.list().unwrap_or_default(), cp)
}

/// [`resolve`] within a listing already made.
pub fn resolve_in(all: &[ListedCheckpoint], cp: &Checkpoint) -> Result<Vec<Checkpoint>, ChainError> {
    let mut chain = vec![cp.clone()];
    while let Some(parent) = chain.last().expect("never empty").manifest.parent.clone() {
        if chain.len() >= MAX_LINKS {
            return Err(ChainError::Loop(cp.id.clone()));
        }
        let child = chain.last().expect("never empty").id.clone();
        let listed = all
            .iter()
            .find(|c| c.id == parent.id)
            .ok_or_else(|| ChainError::MissingParent { child: child.clone(), parent: parent.id.clone() })?;
        let p = match &listed.manifest {
            Ok(m) => Checkpoint { id: listed.id.clone(), dir: listed.dir.clone(), manifest: m.clone() },
            Err(why) => return Err(ChainError::DamagedParentManifest { parent: parent.id, why: why.clone() }),
        };
        let found = p.manifest.content_hash();
        if found != parent.content_hash {
            return Err(ChainError::ReplacedParent { child, parent: parent.id, recorded: parent.content_hash, found });
        }
        chain.push(p);
    }
    Ok(chain)
}

/// The chain of `cp`, written out flat for CRIU ([`flatten`]): every link's listing and every
/// image but its memory pages checked first, and each pages file checked as it is read.
pub fn flatten_verified(store: &CheckpointStore, cp: &Checkpoint) -> Result<PlainImages, ChainError> {
    let chain = resolve(store, cp)?;
    for link in &chain {
        if link.manifest.encryption.is_some() {
            return Err(ChainError::Sealed { id: link.id.clone() });
        }
        let images = link.manifest.images.as_deref().unwrap_or_default();
        let damaged = |problem| ChainError::Damaged { id: link.id.clone(), problem };
        super::verify::check_listing(&link.dir, images).map_err(damaged)?;
        for f in images.iter().filter(|f| !is_pages_file(&f.path)) {
            check_whole(&link.dir, f).map_err(damaged)?;
        }
    }
    flatten(&chain)
}

/// Whether an image (by its path in the manifest) holds memory pages.
fn is_pages_file(path: &str) -> bool {
    super::compress::is_pages(&StoredName::of(path.rsplit('/').next().unwrap_or(path)).plain)
}

/// One image read whole and checked against its manifest entry.
fn check_whole(dir: &Path, f: &ImageFile) -> Result<(), ImageProblem> {
    let hash = super::identity::hash_file(&dir.join(&f.path))
        .map_err(|e| ImageProblem::Unreadable { path: f.path.clone(), error: e.to_string() })?;
    if hash != f.hash {
        return Err(ImageProblem::Checksum(f.path.clone()));
    }
    Ok(())
}

/// The ids of every checkpoint some checkpoint of `kept` needs (its ancestors), which must
/// stay while it does.
pub fn pinned_by(all: &[ListedCheckpoint], kept: &[&ListedCheckpoint]) -> BTreeSet<String> {
    let mut pinned = BTreeSet::new();
    for c in kept {
        let mut next = c.manifest.as_ref().ok().and_then(|m| m.parent.clone());
        while let Some(p) = next.take() {
            if !pinned.insert(p.id.clone()) {
                break;
            }
            next =
                all.iter().find(|c| c.id == p.id).and_then(|c| c.manifest.as_ref().ok()).and_then(|m| m.parent.clone());
        }
    }
    pinned
}

/// The checkpoints of `all` whose parent is `id`.
pub fn children_of<'a>(all: &'a [ListedCheckpoint], id: &str) -> Vec<&'a ListedCheckpoint> {
    all.iter().filter(|c| c.manifest.as_ref().is_ok_and(|m| m.parent.as_ref().is_some_and(|p| p.id == id))).collect()
}

/// One layer of images: newest first, each a directory of one checkpoint.
struct Layer {
    id: String,
    dir: PathBuf,
    /// Its files, by plain name (`pages-1.img`): as stored (`pages-1.img.zst`), with their
    /// manifest entries.
    files: BTreeMap<String, (String, ImageFile)>,
}

fn layers(chain: &[Checkpoint]) -> Vec<Layer> {
    let mut out = Vec::new();
    for cp in chain {
        let images = cp.manifest.images.as_deref().unwrap_or_default();
        let mut rels = vec![IMAGES_DIR.to_string()];
        rels.extend(cp.manifest.pre_copy.clone());
        for rel in rels {
            out.push(Layer { id: cp.id.clone(), dir: cp.dir.join(&rel), files: files_in(images, &rel) });
        }
    }
    out
}

/// The images directly in `rel` (not in a directory under it), by plain name.
fn files_in(images: &[ImageFile], rel: &str) -> BTreeMap<String, (String, ImageFile)> {
    images
        .iter()
        .filter_map(|f| Some((f.path.strip_prefix(rel)?.strip_prefix('/')?, f)))
        .filter(|(name, _)| !name.contains('/'))
        .map(|(name, f)| (StoredName::of(name).plain, (name.to_string(), f.clone())))
        .collect()
}

fn is_pagemap(name: &str) -> bool {
    name.starts_with("pagemap-") && name.ends_with(".img")
}

/// Writes the chain's images as one full, plain checkpoint for CRIU into a private directory
/// beside `chain[0]` (removed when dropped): its own images hard-linked, and for each of its
/// pagemaps one with every run present, its pages gathered from the links, each pages file
/// checked against its manifest entry as it is read. Everything else of the chain must have
/// been checked ([`flatten_verified`]).
fn flatten(chain: &[Checkpoint]) -> Result<PlainImages, ChainError> {
    let top = &chain[0];
    let dir = top.dir.join(".restore-flat");
    let io = |path: &Path, e: &dyn std::fmt::Display| ChainError::Flatten {
        path: path.display().to_string(),
        why: e.to_string(),
    };
    let _ = fs::remove_dir_all(&dir);
    super::durable::create_dir_with_mode(&dir, 0o700).map_err(|e| io(&dir, &e))?;
    let flat = PlainImages { dir };
    let layers = layers(chain);
    for (plain, (stored, _)) in &layers[0].files {
        let from = layers[0].dir.join(stored);
        if is_pagemap(plain) {
            flatten_pagemap(&layers, plain, &flat.dir)?;
        } else if !super::compress::is_pages(plain) {
            fs::hard_link(&from, flat.dir.join(plain)).map_err(|e| io(&from, &e))?;
        }
    }
    Ok(flat)
}

/// A run of one layer's pagemap: where its pages are in the layer's pages file, if there.
#[derive(Debug, Clone, Copy)]
struct Run {
    vaddr: u64,
    pages: u64,
    flags: u32,
    /// Index of its first page in the pages file (present runs only).
    at: u64,
}

struct Pagemap {
    pages_id: u32,
    runs: Vec<Run>,
}

/// A piece of the flat pages file: `pages` pages from page `src` of `layer`'s pages file go
/// to page `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    layer: usize,
    src: u64,
    dst: u64,
    pages: u64,
}

fn read_pagemap(layer: &Layer, name: &str) -> Result<Option<Pagemap>, ChainError> {
    let Some((stored, _)) = layer.files.get(name) else { return Ok(None) };
    if stored != name {
        return Err(ChainError::Sealed { id: layer.id.clone() });
    }
    let (pages_id, raw) = pagemap_runs(&layer.dir, name)
        .map_err(|e| ChainError::Flatten { path: layer.dir.join(name).display().to_string(), why: e.to_string() })?;
    let mut at = 0;
    let mut runs: Vec<Run> = raw
        .into_iter()
        .map(|(vaddr, pages, flags)| {
            let run = Run { vaddr, pages, flags, at };
            if flags & PE_PARENT == 0 {
                at += pages;
            }
            run
        })
        .collect();
    runs.sort_by_key(|r| r.vaddr);
    Ok(Some(Pagemap { pages_id, runs }))
}

/// Where the pages `[vaddr, vaddr + pages * PAGE)` are, from layer `i` down, as pieces for
/// the flat file starting at page `dst`.
fn locate(
    maps: &[Option<Pagemap>],
    i: usize,
    vaddr: u64,
    pages: u64,
    dst: u64,
    out: &mut Vec<Piece>,
) -> Result<(), String> {
    let Some(map) = maps.get(i).and_then(Option::as_ref) else {
        return Err(format!("{pages} pages at {vaddr:#x} are marked as in a parent that does not have them"));
    };
    let end = vaddr + pages * PAGE;
    let mut at = vaddr;
    let first = map.runs.partition_point(|r| r.vaddr + r.pages * PAGE <= at);
    for r in &map.runs[first..] {
        if at >= end {
            break;
        }
        if r.vaddr > at {
            return Err(format!("the page at {at:#x} is in no layer below"));
        }
        let upto = end.min(r.vaddr + r.pages * PAGE);
        let n = (upto - at) / PAGE;
        let d = dst + (at - vaddr) / PAGE;
        if r.flags & PE_PARENT != 0 {
            locate(maps, i + 1, at, n, d, out)?;
        } else {
            out.push(Piece { layer: i, src: r.at + (at - r.vaddr) / PAGE, dst: d, pages: n });
        }
        at = upto;
    }
    if at < end {
        return Err(format!("the page at {at:#x} is in no layer below"));
    }
    Ok(())
}

fn flatten_pagemap(layers: &[Layer], name: &str, out_dir: &Path) -> Result<(), ChainError> {
    let err = |why: String| ChainError::Flatten { path: format!("{}/{name}", layers[0].dir.display()), why };
    let mut maps = Vec::with_capacity(layers.len());
    for layer in layers {
        maps.push(read_pagemap(layer, name)?);
    }
    let top = maps[0].as_ref().expect("the top layer has this pagemap");
    let mut pieces = Vec::new();
    let mut entries = Vec::with_capacity(top.runs.len());
    let mut dst = 0;
    // In the top's own order (CRIU's: by address), every run present in the flat file.
    let (_, raw) = pagemap_runs(&layers[0].dir, name).map_err(|e| err(e.to_string()))?;
    for (vaddr, pages, flags) in raw {
        locate(&maps, 0, vaddr, pages, dst, &mut pieces).map_err(err)?;
        entries.push(super::images::pb::PagemapEntry {
            vaddr,
            compat_nr_pages: 0,
            in_parent: None,
            flags: Some(PE_PRESENT | (flags & PE_LAZY)),
            nr_pages: Some(pages),
        });
        dst += pages;
    }
    let pages_name = format!("pages-{}.img", top.pages_id);
    let out_path = out_dir.join(&pages_name);
    let io = |e: std::io::Error| ChainError::Flatten { path: out_path.display().to_string(), why: e.to_string() };
    let out = fs::File::options().write(true).create_new(true).open(&out_path).map_err(io)?;
    out.set_len(dst * PAGE).map_err(io)?;
    for (i, layer) in layers.iter().enumerate() {
        let mut mine: Vec<Piece> = pieces.iter().copied().filter(|p| p.layer == i).collect();
        if mine.is_empty() {
            continue;
        }
        mine.sort_by_key(|p| p.src);
        let pages_id = maps[i].as_ref().expect("a layer with pieces has the pagemap").pages_id;
        copy_pieces(layer, &format!("pages-{pages_id}.img"), &mine, &out)?;
    }
    out.sync_all().ok();
    super::images::write_pagemap(&out_dir.join(name), top.pages_id, &entries).map_err(io)?;
    Ok(())
}

/// Copies `pieces` (sorted by where they are in the layer's pages file) into `out`, reading
/// the layer's file once from start to end (decompressed as read when stored compressed) and
/// hashing its stored bytes on the way: they must be the manifest's, or the link is damaged.
fn copy_pieces(layer: &Layer, plain: &str, pieces: &[Piece], out: &fs::File) -> Result<(), ChainError> {
    let (stored, entry) = layer.files.get(plain).ok_or_else(|| ChainError::Flatten {
        path: layer.dir.join(plain).display().to_string(),
        why: "the pagemap names a pages file the manifest does not list".into(),
    })?;
    let path = layer.dir.join(stored);
    let name = StoredName::of(stored);
    if name.sealed_as.is_some() {
        return Err(ChainError::Sealed { id: layer.id.clone() });
    }
    let damaged = |problem| ChainError::Damaged { id: layer.id.clone(), problem };
    let file = fs::File::open(&path)
        .map_err(|e| damaged(ImageProblem::Unreadable { path: entry.path.clone(), error: e.to_string() }))?;
    let mut raw = Hashing { inner: file, hasher: blake3::Hasher::new(), read: 0 };
    let copied = if name.compressed {
        zstd::stream::read::Decoder::new(&mut raw).and_then(|mut z| copy_from(&mut z, pieces, out))
    } else {
        copy_from(&mut std::io::BufReader::with_capacity(1 << 20, &mut raw), pieces, out)
    };
    // The rest of the file, so the hash covers all of it (and damage that stopped the copy is
    // named as damage).
    let drained = std::io::copy(&mut raw, &mut std::io::sink());
    if raw.read != entry.size || raw.hasher.finalize().to_hex().as_str() != entry.hash {
        return Err(damaged(ImageProblem::Checksum(entry.path.clone())));
    }
    copied
        .and(drained.map(drop))
        .map_err(|e| ChainError::Flatten { path: path.display().to_string(), why: e.to_string() })
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: blake3::Hasher,
    read: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// The pieces' pages from `input` (the plain pages file, from its start) into `out`.
fn copy_from(input: &mut dyn Read, pieces: &[Piece], out: &fs::File) -> std::io::Result<()> {
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for p in pieces {
        let skip = (p.src - pos) * PAGE;
        let skipped = std::io::copy(&mut input.take(skip), &mut std::io::sink())?;
        if skipped != skip {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the pages file ends early"));
        }
        let mut left = p.pages * PAGE;
        let mut to = p.dst * PAGE;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            input.read_exact(&mut buf[..n])?;
            out.write_all_at(&buf[..n], to)?;
            left -= n as u64;
            to += n as u64;
        }
        pos = p.src + p.pages;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(runs: &[(u64, u64, u32)]) -> Option<Pagemap> {
        let mut at = 0;
        Some(Pagemap {
            pages_id: 1,
            runs: runs
                .iter()
                .map(|&(vaddr, pages, flags)| {
                    let r = Run { vaddr: vaddr * PAGE, pages, flags, at };
                    if flags & PE_PARENT == 0 {
                        at += pages;
                    }
                    r
                })
                .collect(),
        })
    }

    /// A checkpoint in `dir` whose images are `files` (name, bytes), with `parent`.
    fn checkpoint(dir: &Path, id: &str, files: &[(&str, Vec<u8>)], parent: Option<&Checkpoint>) -> Checkpoint {
        fs::create_dir_all(dir.join("images")).unwrap();
        for (name, bytes) in files {
            fs::write(dir.join("images").join(name), bytes).unwrap();
        }
        let mut m: super::super::Manifest = serde_json::from_str(&format!(
            r#"{{"format":3,"id":"{id}","generation":1,"service":"s","kind":"periodic","created_at":"t",
            "stasis_version":"0","criu_version":"4.2.1","kernel_version":"6.1","config_digest":"c",
            "hash_algorithm":"blake3","executables":[],"init_binary":"/i","stdout_pipe_inode":null,
            "size_bytes":0}}"#
        ))
        .unwrap();
        m.images = Some(
            files
                .iter()
                .map(|(name, bytes)| ImageFile {
                    path: format!("images/{name}"),
                    size: bytes.len() as u64,
                    hash: blake3::hash(bytes).to_hex().to_string(),
                })
                .collect(),
        );
        m.parent =
            parent.map(|p| super::super::ParentRef { id: p.id.clone(), content_hash: p.manifest.content_hash() });
        Checkpoint { id: id.into(), dir: dir.to_path_buf(), manifest: m }
    }

    fn pagemap(runs: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut b = crate::store::images::pagemap_head(1);
        for &(vaddr, pages, flags) in runs {
            crate::store::images::push_entry(
                &mut b,
                &crate::store::images::pb::PagemapEntry {
                    vaddr,
                    compat_nr_pages: 0,
                    in_parent: None,
                    flags: Some(flags),
                    nr_pages: Some(pages),
                },
            );
        }
        b
    }

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE as usize]
    }

    /// The flat images are what a full dump of the child's moment would be: every page present,
    /// each from the newest layer that has it, compressed links read through zstd; the child's
    /// other images linked, the parent's not.
    #[test]
    fn a_chain_flattens_into_the_full_images_of_its_newest_link() {
        let d = tempfile::tempdir().unwrap();
        let parent_pages = [page(b'A'), page(b'B'), page(b'C')].concat();
        let parent = checkpoint(
            &d.path().join("p"),
            "p",
            &[
                ("pagemap-1.img", pagemap(&[(0x1000, 3, PE_PRESENT)])),
                ("pages-1.img.zst", zstd::encode_all(&parent_pages[..], 3).unwrap()),
                ("inventory.img", b"parent's".to_vec()),
            ],
            None,
        );
        let child = checkpoint(
            &d.path().join("c"),
            "c",
            &[
                (
                    "pagemap-1.img",
                    pagemap(&[
                        (0x1000, 1, PE_PARENT),
                        (0x2000, 1, PE_PRESENT),
                        (0x3000, 1, PE_PARENT),
                        (0x4000, 1, PE_PRESENT),
                    ]),
                ),
                ("pages-1.img", [page(b'b'), page(b'D')].concat()),
                ("core-1.img", b"core".to_vec()),
            ],
            Some(&parent),
        );
        let flat = flatten(&[child, parent]).unwrap();
        assert_eq!(
            fs::read(flat.dir.join("pages-1.img")).unwrap(),
            [page(b'A'), page(b'b'), page(b'C'), page(b'D')].concat()
        );
        let (_, runs) = pagemap_runs(&flat.dir, "pagemap-1.img").unwrap();
        assert_eq!(runs, (1..=4).map(|n| (n * 0x1000, 1, PE_PRESENT)).collect::<Vec<_>>());
        assert_eq!(fs::read(flat.dir.join("core-1.img")).unwrap(), b"core");
        assert!(!flat.dir.join("inventory.img").exists(), "only the newest link's own images");
    }

    /// The chain is resolved from the manifests: a parent gone, or replaced by another
    /// checkpoint of the same id, is named; a damaged image in a parent is found by `verify`.
    #[test]
    fn a_missing_replaced_or_damaged_parent_is_named() {
        let d = tempfile::tempdir().unwrap();
        let paths = crate::paths::ServicePaths {
            root: d.path().to_path_buf(),
            lock: d.path().join("l"),
            control_socket: d.path().join("s"),
        };
        let store = CheckpointStore::new(&paths);
        let listed = |c: &Checkpoint| ListedCheckpoint {
            id: c.id.clone(),
            dir: c.dir.clone(),
            manifest: Ok(c.manifest.clone()),
        };
        let parent = checkpoint(
            &d.path().join("p"),
            "p",
            &[("pagemap-1.img", pagemap(&[(0x1000, 1, PE_PRESENT)])), ("pages-1.img", page(1))],
            None,
        );
        let child = checkpoint(
            &d.path().join("c"),
            "c",
            &[("pagemap-1.img", pagemap(&[(0x1000, 1, PE_PARENT), (0x2000, 1, PE_PRESENT)])), ("pages-1.img", page(2))],
            Some(&parent),
        );
        assert_eq!(resolve_in(&[listed(&parent), listed(&child)], &child).unwrap().len(), 2);
        let gone = resolve_in(&[listed(&child)], &child).unwrap_err();
        assert!(matches!(&gone, ChainError::MissingParent { parent, .. } if parent == "p"), "{gone}");
        let other = checkpoint(&d.path().join("o"), "p", &[("pages-1.img", page(3))], None);
        let replaced = resolve_in(&[listed(&other), listed(&child)], &child).unwrap_err();
        assert!(matches!(replaced, ChainError::ReplacedParent { .. }), "{replaced}");
        // verify() reads the store: put the two there, then damage the parent's pages.
        fs::create_dir_all(store.dir()).unwrap();
        for c in [&parent, &child] {
            fs::rename(&c.dir, store.dir().join(&c.id)).unwrap();
        }
        let mut child = child;
        child.dir = store.dir().join("c");
        let write_manifest =
            |c: &Checkpoint| fs::write(c.dir.join("manifest.json"), c.manifest.to_sealed_bytes()).unwrap();
        write_manifest(&Checkpoint { dir: store.dir().join("p"), ..parent.clone() });
        write_manifest(&child);
        let flat = flatten_verified(&store, &child).unwrap();
        assert_eq!(fs::read(flat.dir.join("pages-1.img")).unwrap(), [page(1), page(2)].concat());
        drop(flat);
        // A flipped byte in the parent's pages, found as they are read.
        let mut pages = page(1);
        pages[100] ^= 1;
        fs::write(store.dir().join("p/images/pages-1.img"), pages).unwrap();
        let Err(e) = flatten_verified(&store, &child) else { panic!("the damage was not found") };
        assert_eq!(e.damaged_link(), Some("p"), "{e}");
        assert!(e.to_string().contains("images/pages-1.img does not match its checksum"), "{e}");
        // A damaged pagemap of the child's own, found before anything is read.
        fs::write(store.dir().join("p/images/pages-1.img"), page(1)).unwrap();
        let mut map = fs::read(child.dir.join("images/pagemap-1.img")).unwrap();
        let last = map.len() - 1;
        map[last] ^= 1;
        fs::write(child.dir.join("images/pagemap-1.img"), map).unwrap();
        let Err(e) = flatten_verified(&store, &child) else { panic!("the damage was not found") };
        assert_eq!(e.damaged_link(), Some("c"), "{e}");
    }

    #[test]
    fn pages_in_parents_are_found_in_the_layer_that_has_them() {
        let maps = vec![
            // top: pages 0-1 new, 2-5 in the parent, 6 new
            map(&[(0, 2, PE_PRESENT), (2, 4, PE_PARENT), (6, 1, PE_PRESENT)]),
            // parent: 0-3 present, 4-6 in the grandparent
            map(&[(0, 4, PE_PRESENT), (4, 3, PE_PARENT)]),
            // grandparent: everything
            map(&[(0, 8, PE_PRESENT)]),
        ];
        let mut out = Vec::new();
        locate(&maps, 0, 0, 7, 0, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Piece { layer: 0, src: 0, dst: 0, pages: 2 },
                Piece { layer: 1, src: 2, dst: 2, pages: 2 },
                Piece { layer: 2, src: 4, dst: 4, pages: 2 },
                Piece { layer: 0, src: 2, dst: 6, pages: 1 },
            ]
        );
        // A hole no layer fills is an error, never zeros.
        let short = vec![map(&[(0, 3, PE_PARENT)]), map(&[(0, 2, PE_PRESENT)])];
        assert!(locate(&short, 0, 0, 3, 0, &mut Vec::new()).is_err());
        let orphan = vec![map(&[(0, 1, PE_PARENT)])];
        assert!(locate(&orphan, 0, 0, 1, 0, &mut Vec::new()).is_err());
    }
}
