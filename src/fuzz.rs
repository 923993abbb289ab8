//! Property-based fuzzing of what stasis reads from outside: service files, manifests (and the
//! image checks driven by them), the kill-port line protocol and `/proc/net/tcp` lines. Each
//! target must never panic, whatever the input. CI runs a short round; a long one:
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
        if let Some(Ok(text)) = crate::supervisor::protocol::parse_final(&line) {
            let _ = crate::supervisor::protocol::checkpoint_id(&text);
        }
        let _ = crate::supervisor::protocol::looks_like_http(&raw);
        let rendered = crate::supervisor::protocol::final_line(&Err(line.clone()));
        // Whatever the error text, the verdict is the last line and it parses as an error.
        let last = rendered.lines().last().unwrap_or_default();
        assert!(matches!(crate::supervisor::protocol::parse_final(last), Some(Err(_))), "{rendered:?}");
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
use heap::peak_heap;

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
    use crate::criu::images::pb;
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
        let (_, peak) = peak_heap(|| crate::criu::images::summarize(d.path()));
        assert!(
            peak < 8 * MIB,
            "summarize held {peak} bytes of heap for {} bytes of images",
            files.iter().map(|f| f.1.len()).sum::<usize>()
        );
        // Any bytes at all as one image, and as each image in turn.
        std::fs::write(d.path().join(&files[which].0), &raw).unwrap();
        let (_, peak) = peak_heap(|| crate::criu::images::summarize(d.path()));
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
