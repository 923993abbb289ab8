//! Property-based fuzzing of what stasis reads from outside: service files, manifests (and the
//! image checks driven by them), the kill-port line protocol, `/proc/net/tcp` lines, CRIU's
//! images and stats, archive import, sealed images, the supervisor's replies to the CLI and to
//! the hook, the state files and CRIU's logs. Each target must never panic, whatever the input;
//! those that read lengths or streams also prove their heap stays bounded. CI runs a short
//! round; a long one:
//! `FUZZ_CASES=200000 cargo test --release fuzz_ -- --nocapture` (docs/security.md).

use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

/// YAML-looking text: keys stasis knows, near misses, odd scalars, nesting, broken syntax.
fn yamlish() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("command".to_string()),
        Just("user".to_string()),
        Just("kill_port".to_string()),
        Just("criu".to_string()),
        Just("environment".to_string()),
        Just("keep_checkpoints".to_string()),
        Just("dump_timeout".to_string()),
        Just("kill_port_users".to_string()),
        "[a-z_]{1,12}",
    ];
    let value = prop_oneof![
        "[ -~]{0,20}",
        Just("[\"/bin/true\"]".to_string()),
        Just("{config: default, options: [\"--tcp-close\"]}".to_string()),
        Just("-1".to_string()),
        Just("99999999999999999999".to_string()),
        Just("~".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just("*anchor".to_string()),
        Just("&a [1, *a]".to_string()),
    ];
    prop::collection::vec((key, value, 0usize..3), 0..8).prop_map(|entries| {
        entries.into_iter().map(|(k, v, indent)| format!("{}{k}: {v}\n", "  ".repeat(indent))).collect()
    })
}

/// Runs `check` on generated inputs: one round of `FUZZ_CASES` (default 256), repeated with
/// fresh seeds until `FUZZ_SECONDS` have passed (default: one round). Panics are failures;
/// proptest shrinks them to a minimal input.
fn fuzz<S: Strategy>(strategy: S, check: impl Fn(S::Value)) {
    let seconds: u64 = std::env::var("FUZZ_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut rounds = 0u64;
    loop {
        let config = ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() };
        let mut runner = proptest::test_runner::TestRunner::new(config);
        if let Err(e) = runner.run(&strategy, |v| {
            check(v);
            Ok(())
        }) {
            panic!("{e}");
        }
        rounds += 1;
        if std::time::Instant::now() >= deadline {
            break;
        }
    }
    if seconds > 0 {
        eprintln!("fuzz: {rounds} rounds of {} cases in {seconds} s", cases());
    }
}

fn dirs() -> crate::paths::Dirs {
    crate::paths::Dirs::new(
        "/nonexistent/conf".into(),
        "/nonexistent/state".into(),
        "/nonexistent/run".into(),
        Some("/nonexistent/criu".into()),
        "/nonexistent/stasis.yaml".into(),
    )
}

#[test]
fn fuzz_service_file_parser() {
    let dirs = dirs();
    fuzz(prop_oneof![yamlish(), "(?s).{0,200}"], |text: String| {
        let _ = crate::config::parse_and_validate_for_fuzzing(&dirs, &text);
    });
}

const GOOD_MANIFEST: &[u8] = br#"{"format":2,"id":"00000001-x","generation":1,"service":"s","kind":"stop","created_at":"t","stasis_version":"0","criu_version":"4.2.1","init_binary":"/i","stdout_pipe_inode":1,"size_bytes":1,"images":[{"path":"images/../../etc/passwd","size":3,"hash":"00"}],"executables":[{"path":"/bin/sh","size":1,"mtime_ns":1,"dev":1,"inode":1,"hash":"x"}]}"#;

#[test]
fn fuzz_manifest_reader() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("images")).unwrap();
    std::fs::write(d.path().join("images/pages-1.img"), b"abc").unwrap();
    let strategy = (prop::collection::vec(any::<u8>(), 0..400), 0usize..2000, any::<u8>());
    fuzz(strategy, |(bytes, at, delta): (Vec<u8>, usize, u8)| {
        let _ = serde_json::from_slice::<crate::store::Manifest>(&bytes);
        // A real-looking manifest damaged at one place, then used to check images.
        let mut m = GOOD_MANIFEST.to_vec();
        let i = at % m.len();
        m[i] = m[i].wrapping_add(delta.max(1));
        if let Ok(m) = serde_json::from_slice::<crate::store::Manifest>(&m) {
            let _ = crate::store::verify::verify_images(d.path(), m.images.as_deref().unwrap_or(&[]));
        }
    });
}

#[test]
fn fuzz_kill_port_protocol() {
    fuzz(("(?s).{0,120}", prop::collection::vec(any::<u8>(), 0..64)), |(line, raw): (String, Vec<u8>)| {
        use crate::supervisor::protocol::{Asked, Verdict};
        for asked in [Asked::Checkpoint, Asked::DryRun, Asked::Terminate] {
            // Whatever it reads, it shows as the very line it read.
            if let Some(verdict) = Verdict::parse(&line, asked) {
                assert_eq!(verdict.to_string(), line);
            }
        }
        if !raw.is_empty() {
            let request = crate::supervisor::protocol::classify(&raw);
            // Only the exact line stops a service; every other byte string refuses or waits.
            if request == crate::supervisor::protocol::Request::Stop {
                assert!(raw == b"stop\n" || raw == b"stop\r\n", "{raw:?}");
            }
        }
        let lines: Vec<&str> = line.lines().collect();
        let failed = crate::engine::dump::DumpError::criu_failed(&line, &lines);
        let rendered = crate::supervisor::protocol::final_line(&Err(failed.into()));
        // Whatever the error text, the verdict is the last line and it parses as an error.
        let last = rendered.lines().last().unwrap_or_default();
        assert!(matches!(Verdict::parse(last, Asked::Checkpoint), Some(Verdict::Failed(_))), "{rendered:?}");
    });
}

#[test]
fn fuzz_proc_net_tcp_lines() {
    let a: std::net::SocketAddrV4 = "127.0.0.1:7400".parse().unwrap();
    let b: std::net::SocketAddrV4 = "127.0.0.1:50000".parse().unwrap();
    fuzz("(?s)[ -~\n]{0,300}", |table: String| {
        let _ = crate::supervisor::peer_lookup_for_fuzzing(&table, a, b);
    });
}

/// Counts the heap the current thread holds while `peak_heap` measures it, so a target can
/// prove a parser's memory is bounded by what it was built for, not by a length it was told.
/// Other threads (and other tests) are not counted; C libraries' malloc (zstd) is not either.
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    struct Counting;

    thread_local! {
        static ON: Cell<bool> = const { Cell::new(false) };
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn note(delta: isize) {
        // try_with: allocations also happen while a thread's locals are torn down.
        let _ = ON.try_with(|on| {
            if on.get() {
                let live = LIVE.get() + delta;
                LIVE.set(live);
                PEAK.set(PEAK.get().max(live));
            }
        });
    }

    // SAFETY: every call is passed on to System unchanged; only the sizes are noted.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(l) };
            if !p.is_null() {
                note(l.size() as isize);
            }
            p
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(l) };
            if !p.is_null() {
                note(l.size() as isize);
            }
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            unsafe { System.dealloc(p, l) };
            note(-(l.size() as isize));
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            let q = unsafe { System.realloc(p, l, new) };
            if !q.is_null() {
                note(new as isize - l.size() as isize);
            }
            q
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Runs `f` and gives the most heap this thread held at once during it, above what it held
    /// before.
    pub fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, usize) {
        struct Off;
        impl Drop for Off {
            fn drop(&mut self) {
                ON.set(false);
            }
        }
        LIVE.set(0);
        PEAK.set(0);
        ON.set(true);
        let off = Off;
        let out = f();
        drop(off);
        (out, PEAK.get().max(0) as usize)
    }
}
pub(crate) use heap::peak_heap;

const MIB: usize = 1 << 20;

/// A value worth trying where a CRIU image holds an address, a size or a count: the edges
/// where arithmetic overflows, and ordinary ones.
fn edgy_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(4096),
        Just(0x7fff_0000_0000),
        Just(u64::from(u32::MAX)),
        Just(u64::MAX),
        Just(u64::MAX - 4095),
        Just(u64::MAX / 4096 + 1),
        any::<u64>(),
        0u64..0x10000,
    ]
}

/// What one generated CRIU checkpoint holds, before it is written out as image files.
#[derive(Debug, Clone)]
struct Tree {
    pid: u32,
    comm: String,
    arg: (u64, u64),
    vmas: Vec<(u64, u64, u32)>,
    runs: Vec<(u64, Option<u64>, Option<u32>)>,
    pages: Vec<u8>,
    socket: (u32, u32, Vec<u32>, u32),
    fds: Vec<u32>,
}

fn criu_tree() -> impl Strategy<Value = Tree> {
    (
        prop_oneof![Just(1u32), any::<u32>()],
        "[ -~]{0,16}",
        (edgy_u64(), edgy_u64()),
        prop::collection::vec(
            (edgy_u64(), edgy_u64(), prop::sample::select(vec![0u32, 1 << 6, 1 << 7, 1 << 8, 1 << 9, u32::MAX])),
            0..4,
        ),
        prop::collection::vec((edgy_u64(), prop::option::of(edgy_u64()), prop::option::of(any::<u32>())), 0..4),
        prop::collection::vec(any::<u8>(), 0..300),
        (prop::sample::select(vec![2u32, 10, 0]), any::<u32>(), prop::collection::vec(any::<u32>(), 0..6), 0u32..12),
        prop::collection::vec(any::<u32>(), 0..4),
    )
        .prop_map(|(pid, comm, arg, vmas, runs, pages, socket, fds)| Tree {
            pid,
            comm,
            arg,
            vmas,
            runs,
            pages,
            socket,
            fds,
        })
}

/// One image file as CRIU writes it: the magics, then each message after its u32 size.
fn image_file(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = 0x5456_4319u32.to_le_bytes().to_vec();
    out.extend(0x1234_5678u32.to_le_bytes());
    for m in messages {
        out.extend((m.len() as u32).to_le_bytes());
        out.extend(m);
    }
    out
}

/// The image files of `t`, by name, as `stasis inspect` would find them.
fn criu_images(t: &Tree) -> Vec<(String, Vec<u8>)> {
    use crate::store::images::pb;
    use prost::Message;
    let pstree = pb::PstreeEntry { pid: t.pid, ppid: 0, threads: vec![t.pid], ..Default::default() };
    let ids = pb::TaskKobjIdsEntry { files_id: 7, pid_ns_id: Some(1), net_ns_id: Some(2), ..Default::default() };
    let core = pb::CoreEntry {
        tc: Some(pb::TaskCoreEntry { comm: t.comm.clone(), ..Default::default() }),
        ids: Some(ids),
        ..Default::default()
    };
    let mm = pb::MmEntry {
        mm_arg_start: t.arg.0,
        mm_arg_end: t.arg.1,
        vmas: t
            .vmas
            .iter()
            .map(|&(start, end, status)| pb::VmaEntry { start, end, status, ..Default::default() })
            .collect(),
        ..Default::default()
    };
    let head = pb::PagemapHead { pages_id: 3 };
    let runs: Vec<Vec<u8>> = t
        .runs
        .iter()
        .map(|&(vaddr, nr, flags)| {
            pb::PagemapEntry {
                vaddr,
                nr_pages: nr,
                flags,
                compat_nr_pages: nr.unwrap_or(1) as u32,
                ..Default::default()
            }
            .encode_to_vec()
        })
        .collect();
    let (family, state, addr, _) = t.socket.clone();
    let isk = pb::InetSkEntry {
        family,
        proto: 6,
        state,
        src_addr: addr.clone(),
        dst_addr: addr,
        dst_port: 1,
        ..Default::default()
    };
    let files = vec![
        pb::FileEntry { id: 1, isk: Some(isk), ..Default::default() }.encode_to_vec(),
        pb::FileEntry {
            id: 2,
            reg: Some(pb::RegFileEntry { name: t.comm.clone(), ..Default::default() }),
            ..Default::default()
        }
        .encode_to_vec(),
    ];
    let fds: Vec<Vec<u8>> =
        t.fds.iter().map(|&id| pb::FdinfoEntry { id: id % 4, fd: id, ..Default::default() }.encode_to_vec()).collect();
    let mut pagemap = vec![head.encode_to_vec()];
    pagemap.extend(runs);
    vec![
        ("pstree.img".into(), image_file(&[pstree.encode_to_vec()])),
        (format!("core-{}.img", t.pid), image_file(&[core.encode_to_vec()])),
        (format!("mm-{}.img", t.pid), image_file(&[mm.encode_to_vec()])),
        (format!("pagemap-{}.img", t.pid), image_file(&pagemap)),
        ("pages-3.img".into(), t.pages.clone()),
        ("files.img".into(), image_file(&files)),
        ("fdinfo-7.img".into(), image_file(&fds)),
    ]
}

/// Damage done to one file of a near-valid input, the way a disk, a copy or an attacker would.
#[derive(Debug, Clone)]
enum Damage {
    None,
    Flip {
        at: usize,
        xor: u8,
    },
    Truncate {
        at: usize,
    },
    /// A u32 read as "N bytes follow" overwritten (the first one at or after `at` on a 4-byte
    /// boundary of the file).
    Length {
        at: usize,
        value: u32,
    },
    Append(Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        Just(Damage::None),
        (any::<usize>(), 1u8..).prop_map(|(at, xor)| Damage::Flip { at, xor }),
        any::<usize>().prop_map(|at| Damage::Truncate { at }),
        (any::<usize>(), prop_oneof![Just(u32::MAX), Just(u32::MAX - 3), Just(64 << 20), Just(0), any::<u32>()])
            .prop_map(|(at, value)| Damage::Length { at, value }),
        prop::collection::vec(any::<u8>(), 1..40).prop_map(Damage::Append),
    ]
}

fn apply(d: &Damage, bytes: &mut Vec<u8>) {
    let len = bytes.len();
    match d {
        Damage::None => {}
        Damage::Flip { at, xor } if len > 0 => bytes[at % len] ^= xor,
        Damage::Truncate { at } => bytes.truncate(at % (len + 1)),
        Damage::Length { at, value } if len >= 4 => {
            let i = (at % (len - 3)) & !3;
            bytes[i..i + 4].copy_from_slice(&value.to_le_bytes());
        }
        Damage::Append(more) => bytes.extend(more),
        _ => {}
    }
}

#[test]
fn fuzz_criu_images() {
    let strategy = (criu_tree(), 0usize..7, damage(), prop::collection::vec(any::<u8>(), 0..200));
    fuzz(strategy, |(tree, which, damage, raw): (Tree, usize, Damage, Vec<u8>)| {
        let d = tempfile::tempdir().unwrap();
        let mut files = criu_images(&tree);
        apply(&damage, &mut files[which].1);
        for (name, bytes) in &files {
            std::fs::write(d.path().join(name), bytes).unwrap();
        }
        let (_, peak) = peak_heap(|| crate::store::images::summarize(d.path()));
        assert!(
            peak < 8 * MIB,
            "summarize held {peak} bytes of heap for {} bytes of images",
            files.iter().map(|f| f.1.len()).sum::<usize>()
        );
        // Any bytes at all as one image, and as each image in turn.
        std::fs::write(d.path().join(&files[which].0), &raw).unwrap();
        let (_, peak) = peak_heap(|| crate::store::images::summarize(d.path()));
        assert!(peak < 8 * MIB, "summarize held {peak} bytes of heap");
    });
}

/// A `stats-dump` image: the magics, the size, a stats_entry whose field 1 is a dump_stats_entry.
fn stats_image(fields: &[(u64, u64)]) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut dump = Vec::new();
    for &(f, v) in fields {
        put(&mut dump, f << 3);
        put(&mut dump, v);
    }
    let mut entry = Vec::new();
    put(&mut entry, (1 << 3) | 2);
    put(&mut entry, dump.len() as u64);
    entry.extend(dump);
    image_file(&[entry])
}

#[test]
fn fuzz_criu_stats() {
    let fields = prop::collection::vec((0u64..12, edgy_u64()), 0..8);
    fuzz(
        (fields, damage(), prop::collection::vec(any::<u8>(), 0..120)),
        |(fields, damage, raw): (Vec<(u64, u64)>, Damage, Vec<u8>)| {
            let d = tempfile::tempdir().unwrap();
            let mut image = stats_image(&fields);
            apply(&damage, &mut image);
            for bytes in [&image, &raw] {
                std::fs::write(d.path().join(crate::criu::stats::DUMP_STATS), bytes).unwrap();
                let (_, peak) = peak_heap(|| crate::criu::stats::dump_stats(d.path()));
                assert!(peak < MIB, "dump_stats held {peak} bytes of heap for {} bytes", bytes.len());
            }
        },
    );
}

/// One tar member as a hostile exporter could write it: any name, type, link and size field.
#[derive(Debug, Clone)]
struct Member {
    name: Vec<u8>,
    kind: u8,
    data: Vec<u8>,
    /// The size field, when it lies about `data`.
    size: Option<u64>,
    link: Vec<u8>,
}

impl Member {
    fn file(name: &str, data: &[u8]) -> Member {
        Member { name: name.as_bytes().to_vec(), kind: b'0', data: data.to_vec(), size: None, link: Vec::new() }
    }
}

/// A tar stream written byte by byte (tar::Builder refuses the names an attacker would use).
fn tar_stream(members: &[Member]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in members {
        let mut h = [0u8; 512];
        let n = m.name.len().min(100);
        h[..n].copy_from_slice(&m.name[..n]);
        h[100..108].copy_from_slice(b"0000600\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        let size = m.size.unwrap_or(m.data.len() as u64);
        if size < 0o77777777777 {
            h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        } else {
            // GNU base-256: what a size above 8 GiB looks like.
            h[124] = 0x80;
            h[128..136].copy_from_slice(&size.to_be_bytes());
        }
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = m.kind;
        let l = m.link.len().min(100);
        h[157..157 + l].copy_from_slice(&m.link[..l]);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend(h);
        out.extend(&m.data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.extend([0u8; 1024]);
    out
}

/// How a generated archive departs from what `stasis export` writes.
#[derive(Debug, Clone)]
enum Tamper {
    None,
    /// An image named (in the manifest and the tar alike) so that it would land elsewhere.
    Name {
        image: usize,
        name: usize,
    },
    /// An image that is a symlink or hard link (to `link`), listed with an empty file's hash.
    Link {
        image: usize,
        kind: u8,
        link: usize,
    },
    /// A GNU long name/link, pax or sparse member of `size` bytes before member `at`.
    Extension {
        at: usize,
        kind: u8,
        size: usize,
    },
    /// A size field of member `at` set to `size` (the data is not there).
    Size {
        at: usize,
        size: u64,
    },
    /// The tar stream damaged, before compression.
    Tar(Damage),
    /// The compressed stream damaged.
    Zstd(Damage),
    /// A member the manifest does not list, at the end.
    Extra,
    /// An image listed, and present, twice.
    Twice {
        image: usize,
    },
    /// An image with a name over 100 bytes, in a GNU long-name member before it (as
    /// tar::Builder writes it): a good archive still.
    LongName {
        image: usize,
        len: usize,
    },
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        2 => Just(Tamper::None),
        2 => (any::<usize>(), 0usize..HOSTILE_NAMES + 1).prop_map(|(image, name)| Tamper::Name { image, name }),
        1 => (any::<usize>(), prop::sample::select(vec![b'1', b'2', b'3', b'4', b'5', b'6', b'7']), 0usize..HOSTILE_NAMES + 1)
            .prop_map(|(image, kind, link)| Tamper::Link { image, kind, link }),
        2 => (any::<usize>(), prop::sample::select(vec![b'L', b'K', b'x', b'g', b'S']), prop::sample::select(vec![0usize, 100, 4096, 16 << 20]))
            .prop_map(|(at, kind, size)| Tamper::Extension { at, kind, size }),
        1 => (any::<usize>(), prop_oneof![Just(u64::MAX), Just(u64::MAX >> 1), Just(0o77777777777u64), Just(1 << 40), 0u64..2000])
            .prop_map(|(at, size)| Tamper::Size { at, size }),
        2 => damage().prop_map(Tamper::Tar),
        2 => damage().prop_map(Tamper::Zstd),
        1 => Just(Tamper::Extra),
        1 => any::<usize>().prop_map(|image| Tamper::Twice { image }),
        1 => (any::<usize>(), 94usize..250).prop_map(|(image, len)| Tamper::LongName { image, len }),
    ]
}

const HOSTILE_NAMES: usize = 9;

/// Names that must never become a file outside `stage/images` (`root` is the test's directory;
/// `stage` the one the archive is read into): the last one is absolute, into `root/outside`.
fn hostile_name(i: usize, root: &Path) -> String {
    [
        "../outside/x",
        "images/../../outside/x",
        "images/../images/x",
        "images/.x",
        "images/x/",
        "./images/x",
        "images",
        "images/sub/x",
        "x",
    ]
    .get(i)
    .map_or_else(|| format!("{}/outside/abs", root.display()), |n| n.to_string())
}

use std::path::Path;

/// An archive as `stasis export` writes it of `images`, then `t` done to it.
fn export_archive(images: &[Vec<u8>], t: &Tamper, root: &Path) -> Vec<u8> {
    let hash = |b: &[u8]| blake3::hash(b).to_hex().to_string();
    let mut listed: Vec<(String, Vec<u8>)> =
        images.iter().enumerate().map(|(i, data)| (format!("images/pages-{i}.img"), data.clone())).collect();
    let mut kinds = vec![(b'0', Vec::new()); listed.len()];
    let pick = |i: usize, n: usize| if n == 0 { None } else { Some(i % n) };
    match *t {
        Tamper::Name { image, name } => {
            if let Some(i) = pick(image, listed.len()) {
                listed[i].0 = hostile_name(name, root);
            }
        }
        Tamper::Link { image, kind, link } => {
            if let Some(i) = pick(image, listed.len()) {
                listed[i].1.clear();
                kinds[i] = (kind, hostile_name(link, root).into_bytes());
            }
        }
        Tamper::Twice { image } => {
            if let Some(i) = pick(image, listed.len()) {
                listed.push(listed[i].clone());
                kinds.push(kinds[i].clone());
            }
        }
        Tamper::LongName { image, len } => {
            if let Some(i) = pick(image, listed.len()) {
                listed[i].0 = format!("images/shm-{}", "n".repeat(len));
            }
        }
        _ => {}
    }
    let manifest = serde_json::json!({
        "format": 2, "id": "00000001-x", "generation": 1, "service": "s", "kind": "stop",
        "created_at": "t", "stasis_version": "0", "criu_version": "4.2.1", "init_binary": "/i",
        "stdout_pipe_inode": 1, "size_bytes": 1, "hash_algorithm": "blake3", "executables": [],
        "config_digest": "c", "kernel_version": "k",
        "images": listed.iter().map(|(p, d)| serde_json::json!({"path": p, "size": d.len(), "hash": hash(d)})).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let header = serde_json::json!({
        "format": 1, "service": "s", "checkpoint": "00000001-x", "manifest_blake3": hash(&manifest),
        "stasis_version": "0", "exported_at": "t",
    });
    let mut members = vec![
        Member::file(crate::store::archive::HEADER_NAME, &serde_json::to_vec(&header).unwrap()),
        Member::file("manifest.json", &manifest),
    ];
    for ((name, data), (kind, link)) in listed.iter().zip(kinds) {
        if name.len() > 100 {
            let mut long = name.as_bytes().to_vec();
            long.push(0);
            members.push(Member { name: b"././@LongLink".to_vec(), kind: b'L', ..Member::file("", &long) });
        }
        members.push(Member { kind, link, ..Member::file(name, data) });
    }
    match t {
        Tamper::Extension { at, kind, size } => {
            let ext = Member {
                name: b"././@LongLink".to_vec(),
                kind: *kind,
                data: vec![b'a'; *size],
                size: None,
                link: Vec::new(),
            };
            members.insert(at % (members.len() + 1), ext);
        }
        Tamper::Size { at, size } => {
            let i = at % members.len();
            members[i].size = Some(*size);
        }
        Tamper::Extra => members.push(Member::file("images/extra.img", b"more")),
        _ => {}
    }
    let mut tar = tar_stream(&members);
    if let Tamper::Tar(d) = t {
        apply(d, &mut tar);
    }
    let mut z = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    z.include_checksum(true).unwrap();
    std::io::Write::write_all(&mut z, &tar).unwrap();
    let mut out = z.finish().unwrap();
    if let Tamper::Zstd(d) = t {
        apply(d, &mut out);
    }
    out
}

/// Every path under `root`, with whether it is a symlink.
fn walk(root: &Path, out: &mut Vec<(std::path::PathBuf, bool)>) {
    for e in std::fs::read_dir(root).unwrap().map(Result::unwrap) {
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        out.push((e.path(), meta.file_type().is_symlink()));
        if meta.is_dir() {
            walk(&e.path(), out);
        }
    }
}

#[test]
fn fuzz_archive_import() {
    // A checkpoint has at least one image (a manifest that lists none is damaged).
    let images = prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..4);
    let strategy = (images, tamper(), prop::collection::vec(any::<u8>(), 0..300));
    fuzz(strategy, |(images, tamper, raw): (Vec<Vec<u8>>, Tamper, Vec<u8>)| {
        let root = tempfile::tempdir().unwrap();
        let stage = root.path().join("stage");
        std::fs::create_dir_all(stage.join("images")).unwrap();
        std::fs::create_dir(root.path().join("outside")).unwrap();
        let archive = export_archive(&images, &tamper, root.path());
        let (result, peak) = peak_heap(|| crate::store::archive::read(archive.as_slice(), &stage));
        // The copy buffer (1 MiB) and a manifest this size: whatever the archive says it holds.
        assert!(peak < 4 * MIB, "import held {peak} bytes of heap for a {} byte archive ({tamper:?})", archive.len());
        if matches!(tamper, Tamper::None | Tamper::LongName { .. }) {
            let imported = result.unwrap_or_else(|e| panic!("a good archive was refused: {e}"));
            let listed = imported.manifest.images.unwrap_or_default();
            assert_eq!(listed.len(), images.len());
            for (img, data) in listed.iter().zip(&images) {
                assert_eq!(&std::fs::read(stage.join(&img.path)).unwrap(), data);
            }
        }
        let mut found = Vec::new();
        walk(root.path(), &mut found);
        for (path, symlink) in found {
            let inside = path.strip_prefix(stage.join("images")).is_ok_and(|rest| rest.components().count() == 1);
            let expected = [stage.clone(), stage.join("images"), root.path().join("outside")].contains(&path);
            assert!(expected || (inside && !symlink), "{} was written by an import of {tamper:?}", path.display());
        }
        let (_, peak) = peak_heap(|| crate::store::archive::read(raw.as_slice(), &root.path().join("raw")));
        assert!(peak < 4 * MIB, "import held {peak} bytes of heap for {} raw bytes", raw.len());
    });
}

/// What a peer on a socket sends: generated text, then maybe a long run of one byte (an endless
/// line, endless empty lines, invalid UTF-8), then more text.
fn peer_stream() -> impl Strategy<Value = (Vec<u8>, u8, usize, Vec<u8>)> {
    let line = prop_oneof![
        Just("Saving checkpoint of s and shutting down...".to_string()),
        Just("Progress: 1.2 GiB written".to_string()),
        Just("OK checkpoint 20261125T015053.123Z-1 saved (4.8 MiB, 0.06 s) in /x".to_string()),
        Just("ERROR failed to dump".to_string()),
        Just("OK".to_string()),
        Just("OK checkpoint".to_string()),
        "(?s).{0,40}",
    ];
    let text = prop::collection::vec((line, prop::sample::select(vec!["\n", "\r\n", ""])), 0..5)
        .prop_map(|ls| ls.into_iter().flat_map(|(l, end)| format!("{l}{end}").into_bytes()).collect::<Vec<u8>>());
    let bytes = prop_oneof![text.clone(), prop::collection::vec(any::<u8>(), 0..80)];
    (
        bytes,
        prop::sample::select(vec![b'x', b'\n', 0xff, b'\r']),
        prop_oneof![20 => prop::sample::select(vec![0usize, 0, 0, 100, 70_000]), 1 => Just(6usize << 20)],
        text,
    )
}

fn stream_of(head: &[u8], fill: u8, n: usize, tail: &[u8]) -> impl std::io::Read {
    use std::io::Read;
    let head = std::io::Cursor::new(head.to_vec());
    head.chain(std::io::repeat(fill).take(n as u64)).chain(std::io::Cursor::new(tail.to_vec()))
}

/// The supervisor's lines as `stasis stop` and `stasis checkpoint` read them (the kill port,
/// the control socket), then its final line as they parse it.
#[test]
fn fuzz_control_replies() {
    fuzz(peer_stream(), |(head, fill, n, tail): (Vec<u8>, u8, usize, Vec<u8>)| {
        let (got, peak) = peak_heap(|| crate::cli::relay(stream_of(&head, fill, n, &tail), true));
        assert!(peak < 4 * MIB, "relay held {peak} bytes of heap for {n} bytes of {fill:#x}");
        if let Ok((last, _)) = &got {
            use crate::supervisor::protocol::{Asked, Verdict};
            let _ = Verdict::parse(last, Asked::Checkpoint);
        }
        // What fits the bounds reads as every line did before them.
        if n < 1000 {
            let mut all = head.clone();
            all.extend(std::iter::repeat_n(fill, n));
            all.extend(&tail);
            let before = std::io::BufRead::lines(all.as_slice()).collect::<Result<Vec<String>, _>>();
            match (before, got) {
                (Ok(lines), Ok((last, kept))) => {
                    assert_eq!(last, lines.last().cloned().unwrap_or_default());
                    assert_eq!(kept, lines);
                }
                (Err(_), Err(_)) => {}
                (a, b) => panic!("{a:?} became {:?}", b.map(|(l, _)| l).map_err(|e| e.to_string())),
            }
        }
    });
}

/// Sealed images (`.enc`): the header and every chunk are checked; any change must fail.
#[test]
fn fuzz_sealed_image() {
    let key = crate::store::seal::Key::from_bytes([7; 32]);
    // Mostly one chunk: ChaCha20 is slow in unoptimized test builds.
    let sizes = prop_oneof![
        60 => prop::sample::select(vec![0usize, 1, 100, 4096]),
        1 => prop::sample::select(vec![(1 << 20) - 1, 1 << 20, (1 << 20) + 1]),
    ];
    let strategy = (sizes, any::<u8>(), damage(), prop::collection::vec(any::<u8>(), 0..200));
    fuzz(strategy, |(size, byte, damage, raw): (usize, u8, Damage, Vec<u8>)| {
        let data = vec![byte; size];
        let mut sealed = Vec::new();
        crate::store::seal::seal(data.as_slice(), &mut sealed, "pages-1.img", &key).unwrap();
        let mut damaged = sealed.clone();
        apply(&damage, &mut damaged);
        let mut out = Vec::new();
        let (result, peak) = peak_heap(|| crate::store::seal::open(damaged.as_slice(), &mut out, "pages-1.img", &key));
        // Two chunk buffers and one chunk of plaintext, beside what was written out.
        assert!(peak < 4 * MIB + out.capacity(), "open held {peak} bytes of heap");
        if damaged == sealed {
            result.unwrap();
            assert_eq!(out, data);
        } else {
            assert!(result.is_err(), "{damage:?} went unnoticed");
        }
        let (result, _) = peak_heap(|| crate::store::seal::open(raw.as_slice(), std::io::sink(), "pages-1.img", &key));
        assert!(result.is_err());
    });
}

/// What the CLI and the supervisor read back from the state directory (status.json,
/// generation.json, counters.json) and the lines picked out of CRIU's logs.
#[test]
fn fuzz_state_files_and_criu_logs() {
    let json = prop_oneof![
        Just(r#"{"name":"s","state":"running","init_pid":1,"supervisor_pid":2,"started_from":"cold","restored_checkpoint":null,"fallback_reason":null,"since":"t","message":null}"#.to_string()),
        Just(r#"{"last":18446744073709551615,"last_run":18446744073709551615}"#.to_string()),
        Just(r#"{"restores":18446744073709551615,"checkpoints":-1}"#.to_string()),
        "(?s).{0,120}",
    ];
    let log_line = prop_oneof![
        Just("(00.1) Error (criu/files-reg.c:1): Can't create link remap for /x. Use".to_string()),
        Just("(00.1) Error (criu/files-reg.c:1): Can't dump ghost file ".to_string()),
        Just("Can't dump half of stream unix connection. name: ".to_string()),
        Just("(00.1) Runaway socket: ino 1 type 1 name".to_string()),
        Just("Error (sk-unix.c:1): External socket is used".to_string()),
        "(?s).{0,60}",
    ];
    let log = prop::collection::vec((log_line, "(?s).{0,20}"), 0..40)
        .prop_map(|ls| ls.into_iter().map(|(a, b)| format!("{a}{b}\n")).collect::<String>());
    fuzz((json, damage(), log, edgy_u64()), |(text, damage, log, floor): (String, Damage, String, u64)| {
        let mut bytes = text.into_bytes();
        apply(&damage, &mut bytes);
        let _ = serde_json::from_slice::<crate::supervisor::status::StatusRecord>(&bytes);
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(crate::store::counters::COUNTERS_FILE), &bytes).unwrap();
        let _ = crate::store::counters::load(d.path());
        std::fs::write(d.path().join(crate::store::generation::GENERATION_FILE), &bytes).unwrap();
        let g = crate::store::generation::GenerationFile::new(d.path()).load(|| floor.min(u64::MAX - 1));
        let _ = g.freshness(Some(floor), crate::store::DumpKind::Stop);
        let picked = crate::criu::pick_log_errors(&log);
        let _ = crate::criu::diagnose::diagnose(&picked, "svc");
        let _ = crate::criu::diagnose::diagnose(&log.lines().map(str::to_string).collect::<Vec<_>>(), "svc");
    });
}
