//! Reading CRIU's image files natively (for `stasis inspect`), with prost types generated from
//! CRIU's own schemas (proto/criu, compiled by build.rs). An image file is a magic number (two,
//! for most: the common one, then the image's own), then entries, each a little-endian u32 size
//! and a protobuf message. Images are input from disk, maybe from another host: every size is
//! bounded, every index checked; a damaged image is an error, never a panic.

use prost::Message;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[allow(clippy::all, dead_code)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/images/_.rs"));
}

pub(crate) const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
pub(crate) const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// No entry of the images read here comes near this.
const MAX_ENTRY: usize = 64 << 20;
pub(crate) const PAGE: u64 = 4096;
/// pagemap entry flags (criu/include/pagemap.h).
pub(crate) const PE_PARENT: u32 = 1 << 0;
pub(crate) const PE_LAZY: u32 = 1 << 1;
pub(crate) const PE_PRESENT: u32 = 1 << 2;
/// VMA status bits (criu/include/image.h).
const VMA_FILE_PRIVATE: u32 = 1 << 6;
const VMA_FILE_SHARED: u32 = 1 << 7;
const VMA_ANON_SHARED: u32 = 1 << 8;
const VMA_ANON_PRIVATE: u32 = 1 << 9;
/// TCP states (include/net/tcp_states.h) and socket families.
const TCP_ESTABLISHED: u32 = 1;
const TCP_LISTEN: u32 = 10;
const AF_INET6: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("failed to read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is damaged: {why}")]
    Damaged { path: String, why: String },
}

/// The messages of one image file, after its magic.
fn entries<M: Message + Default>(dir: &Path, name: &str, skip_head: bool) -> Result<Vec<M>, ImageError> {
    let path = dir.join(name);
    let shown = format!("images/{name}");
    let bytes = std::fs::read(&path).map_err(|source| ImageError::Read { path: shown.clone(), source })?;
    let damaged = |why: String| ImageError::Damaged { path: shown.clone(), why };
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let mut at = 4;
    if matches!(u32_at(0), Some(IMG_COMMON_MAGIC | IMG_SERVICE_MAGIC)) {
        at = 8;
    }
    if bytes.len() < at {
        return Err(damaged("too short for its magic".into()));
    }
    let mut out = Vec::new();
    let mut first = true;
    while at < bytes.len() {
        let size = u32_at(at).ok_or_else(|| damaged(format!("a truncated entry size at byte {at}")))? as usize;
        at += 4;
        if size > MAX_ENTRY || at + size > bytes.len() {
            return Err(damaged(format!("an entry of {size} bytes at byte {at} runs past the end")));
        }
        let body = &bytes[at..at + size];
        at += size;
        if skip_head && first {
            first = false;
            continue;
        }
        out.push(M::decode(body).map_err(|e| damaged(format!("an entry does not decode: {e}")))?);
    }
    Ok(out)
}

fn one<M: Message + Default>(dir: &Path, name: &str) -> Result<M, ImageError> {
    entries::<M>(dir, name, false)?
        .into_iter()
        .next()
        .ok_or_else(|| ImageError::Damaged { path: format!("images/{name}"), why: "it has no entry".into() })
}

/// What a checkpoint's images hold, for people.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    pub processes: Vec<Process>,
    /// Bytes of memory in the images, by kind: pages CRIU saved (what a restore brings back).
    pub memory: Memory,
    pub sockets: Vec<Socket>,
    /// Namespace ids of the root process (CRIU's numbering), by kind.
    pub namespaces: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Process {
    /// PID inside the checkpoint's PID namespace.
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    pub command_line: Vec<String>,
    pub uid: Option<u32>,
    pub threads: usize,
    /// Memory saved for this process, in bytes.
    pub memory_bytes: u64,
    /// Open file descriptors: number and what each is.
    pub files: Vec<OpenFile>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    pub anonymous: u64,
    pub file_backed: u64,
    pub shared: u64,
    pub total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpenFile {
    pub fd: u32,
    pub what: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Socket {
    pub protocol: String,
    /// `listening`, `established` or another state.
    pub state: String,
    pub local: String,
    pub remote: Option<String>,
}

pub fn summarize(images: &Path) -> Result<ImageSummary, ImageError> {
    let tree: Vec<pb::PstreeEntry> = entries(images, "pstree.img", false)?;
    let files: Vec<pb::FileEntry> = entries(images, "files.img", false).unwrap_or_default();
    let by_id: BTreeMap<u32, &pb::FileEntry> = files.iter().map(|f| (f.id, f)).collect();
    let mut processes = Vec::new();
    let mut memory = Memory::default();
    let mut namespaces = BTreeMap::new();
    for (i, p) in tree.iter().enumerate() {
        let core: pb::CoreEntry = one(images, &format!("core-{}.img", p.pid))?;
        let ids = core.ids.or_else(|| one::<pb::TaskKobjIdsEntry>(images, &format!("ids-{}.img", p.pid)).ok());
        if i == 0 {
            if let Some(ids) = &ids {
                for (k, v) in [
                    ("pid", ids.pid_ns_id),
                    ("net", ids.net_ns_id),
                    ("ipc", ids.ipc_ns_id),
                    ("uts", ids.uts_ns_id),
                    ("mnt", ids.mnt_ns_id),
                    ("user", ids.user_ns_id),
                    ("cgroup", ids.cgroup_ns_id),
                    ("time", ids.time_ns_id),
                ] {
                    if let Some(v) = v {
                        namespaces.insert(k.to_string(), v);
                    }
                }
            }
        }
        let mm: Option<pb::MmEntry> = one(images, &format!("mm-{}.img", p.pid)).ok();
        let pages = Pages::open(images, p.pid)?;
        let mut own = 0;
        if let Some(mm) = &mm {
            for (start, len) in &pages.present {
                let kind = mm.vmas.iter().find(|v| v.start <= *start && *start < v.end).map_or(0, |v| v.status);
                // Run sizes come from the image: damage must not wrap a sum (or panic).
                if kind & (VMA_ANON_SHARED | VMA_FILE_SHARED) != 0 {
                    memory.shared = memory.shared.saturating_add(*len);
                } else if kind & VMA_FILE_PRIVATE != 0 {
                    memory.file_backed = memory.file_backed.saturating_add(*len);
                } else if kind & VMA_ANON_PRIVATE != 0 || kind == 0 {
                    memory.anonymous = memory.anonymous.saturating_add(*len);
                }
                own = len.saturating_add(own);
            }
        }
        memory.total = memory.total.saturating_add(own);
        let command_line = mm
            .as_ref()
            .and_then(|m| pages.read(m.mm_arg_start, m.mm_arg_end.saturating_sub(m.mm_arg_start).min(64 << 10)))
            .map(|b| {
                b.split(|c| *c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let uid = core.thread_core.as_ref().and_then(|t| t.creds.as_ref()).map(|c| c.uid);
        let mut open = Vec::new();
        if let Some(ids) = &ids {
            let fds: Vec<pb::FdinfoEntry> =
                entries(images, &format!("fdinfo-{}.img", ids.files_id), false).unwrap_or_default();
            for fd in fds {
                open.push(OpenFile { fd: fd.fd, what: by_id.get(&fd.id).map_or_else(|| "?".into(), |f| describe(f)) });
            }
        }
        processes.push(Process {
            pid: p.pid,
            ppid: p.ppid,
            comm: core.tc.as_ref().map(|t| t.comm.clone()).unwrap_or_default(),
            command_line,
            uid,
            threads: p.threads.len().max(1),
            memory_bytes: own,
            files: open,
        });
    }
    let sockets = files.iter().filter_map(|f| f.isk.as_ref()).map(inet).collect();
    Ok(ImageSummary { processes, memory, sockets, namespaces })
}

/// A pagemap image's pages file number and its runs: (address, pages, flags).
pub(crate) fn pagemap_runs(images: &Path, name: &str) -> Result<(u32, Vec<(u64, u64, u32)>), ImageError> {
    let head: pb::PagemapHead = one(images, name)?;
    let runs: Vec<pb::PagemapEntry> = entries(images, name, true)?;
    let runs = runs
        .iter()
        .map(|e| (e.vaddr, e.nr_pages.unwrap_or(e.compat_nr_pages as u64), e.flags.unwrap_or(PE_PRESENT)))
        .collect();
    Ok((head.pages_id, runs))
}

/// An image entry: its size as a little-endian u32, then the message.
pub(crate) fn push_entry(into: &mut Vec<u8>, m: &impl Message) {
    into.extend((m.encoded_len() as u32).to_le_bytes());
    m.encode(into).expect("a Vec grows");
}

/// The start of a pagemap image: the magics and its head (which pages file it reads).
pub(crate) fn pagemap_head(pages_id: u32) -> Vec<u8> {
    let mut pagemap = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
    pagemap.extend(PAGEMAP_MAGIC.to_le_bytes());
    push_entry(&mut pagemap, &pb::PagemapHead { pages_id });
    pagemap
}

/// Writes a whole pagemap image at `path` (a new file), fsynced.
pub(crate) fn write_pagemap(path: &Path, pages_id: u32, entries: &[pb::PagemapEntry]) -> std::io::Result<()> {
    use std::io::Write;
    let mut bytes = pagemap_head(pages_id);
    for e in entries {
        push_entry(&mut bytes, e);
    }
    let mut f = std::fs::File::options().write(true).create_new(true).open(path)?;
    f.write_all(&bytes)?;
    f.sync_all()
}

/// One process's saved pages: where they are in memory and in its pages file.
struct Pages {
    /// (virtual address, bytes) of each run of present pages, in file order.
    present: Vec<(u64, u64)>,
    file: Option<std::fs::File>,
}

impl Pages {
    fn open(images: &Path, pid: u32) -> Result<Pages, ImageError> {
        let name = format!("pagemap-{pid}.img");
        if !images.join(&name).exists() {
            return Ok(Pages { present: Vec::new(), file: None });
        }
        let head: pb::PagemapHead = one(images, &name)?;
        let runs: Vec<pb::PagemapEntry> = entries(images, &name, true)?;
        let present = runs
            .iter()
            .filter(|e| e.flags.unwrap_or(PE_PRESENT) & PE_PRESENT != 0)
            .map(|e| (e.vaddr, e.nr_pages.unwrap_or(e.compat_nr_pages as u64).saturating_mul(PAGE)))
            .collect();
        let file = std::fs::File::open(images.join(format!("pages-{}.img", head.pages_id))).ok();
        Ok(Pages { present, file })
    }

    /// `len` bytes of memory at `addr`, if they were saved (in one run).
    fn read(&self, addr: u64, len: u64) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        // Addresses and run sizes come from the images: a sum that overflows is damage, not a
        // place in memory.
        let end = addr.checked_add(len)?;
        let mut offset = 0u64;
        for (start, bytes) in &self.present {
            if *start <= addr && end <= start.checked_add(*bytes)? {
                let mut buf = vec![0u8; len as usize];
                self.file.as_ref()?.read_exact_at(&mut buf, offset.checked_add(addr - start)?).ok()?;
                return Some(buf);
            }
            offset = offset.checked_add(*bytes)?;
        }
        None
    }
}

fn describe(f: &pb::FileEntry) -> String {
    if let Some(r) = &f.reg {
        return r.name.clone();
    }
    if let Some(s) = &f.isk {
        let s = inet(s);
        return format!(
            "{} socket {} {}{}",
            s.protocol,
            s.state,
            s.local,
            s.remote.map(|r| format!(" -> {r}")).unwrap_or_default()
        );
    }
    if let Some(u) = &f.usk {
        let name = String::from_utf8_lossy(&u.name).into_owned();
        return if name.is_empty() { "unix socket".into() } else { format!("unix socket {name}") };
    }
    if let Some(p) = &f.pipe {
        return format!("pipe:[{}]", p.pipe_id);
    }
    if f.tty.is_some() {
        return "tty".into();
    }
    if f.efd.is_some() {
        return "eventfd".into();
    }
    if f.epfd.is_some() {
        return "eventpoll".into();
    }
    if f.tfd.is_some() {
        return "timerfd".into();
    }
    if f.sgfd.is_some() {
        return "signalfd".into();
    }
    if let Some(m) = &f.memfd {
        return format!("memfd {}", m.id);
    }
    format!("file of type {}", f.r#type)
}

fn inet(s: &pb::InetSkEntry) -> Socket {
    let addr = |words: &[u32], port: u32| {
        let ip = if s.family == AF_INET6 && words.len() == 4 {
            let mut b = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            format!("[{}]", std::net::Ipv6Addr::from(b))
        } else {
            words.first().map(|w| std::net::Ipv4Addr::from(w.to_ne_bytes()).to_string()).unwrap_or_default()
        };
        format!("{ip}:{port}")
    };
    let protocol = match (s.proto, s.r#type) {
        (6, _) => "tcp",
        (17, _) => "udp",
        _ => "inet",
    };
    let state = match s.state {
        TCP_LISTEN => "listening".to_string(),
        TCP_ESTABLISHED => "established".to_string(),
        7 if protocol == "udp" => "bound".to_string(),
        n => format!("state {n}"),
    };
    let remote = (s.state != TCP_LISTEN && s.dst_port != 0).then(|| addr(&s.dst_addr, s.dst_port));
    Socket { protocol: protocol.into(), state, local: addr(&s.src_addr, s.src_port), remote }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn image(messages: &[Vec<u8>]) -> Vec<u8> {
        let mut out = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
        out.extend(0x1234_5678u32.to_le_bytes());
        for m in messages {
            out.extend((m.len() as u32).to_le_bytes());
            out.extend(m);
        }
        out
    }

    // Found by fuzz_criu_images: addresses and run sizes near u64::MAX overflowed the sums.
    #[test]
    fn runs_that_wrap_around_memory_are_damage_not_a_panic() {
        let pages = Pages { present: vec![(1 << 20, u64::MAX - 4095), (0, 4096)], file: None };
        assert_eq!(pages.read(u64::MAX - 1, 64), None);
        assert_eq!(pages.read(2 << 20, 1), None);
        let d = tempfile::tempdir().unwrap();
        let run = |vaddr| pb::PagemapEntry { vaddr, nr_pages: Some(u64::MAX), ..Default::default() }.encode_to_vec();
        let files = [
            ("pstree.img", image(&[pb::PstreeEntry { pid: 1, ..Default::default() }.encode_to_vec()])),
            ("core-1.img", image(&[pb::CoreEntry::default().encode_to_vec()])),
            (
                "mm-1.img",
                image(&[pb::MmEntry { mm_arg_start: 0, mm_arg_end: 16, ..Default::default() }.encode_to_vec()]),
            ),
            ("pagemap-1.img", image(&[pb::PagemapHead { pages_id: 1 }.encode_to_vec(), run(4096), run(0)])),
        ];
        for (name, bytes) in files {
            std::fs::write(d.path().join(name), bytes).unwrap();
        }
        let s = summarize(d.path()).unwrap();
        assert_eq!(s.memory.total, u64::MAX, "saturated, not wrapped");
    }
}
