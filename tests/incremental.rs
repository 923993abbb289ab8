//! Incremental checkpoints (issue 23) need the kernel to track dirty pages (soft-dirty). Every
//! test here starts with `common::vm::soft_dirty_here_or_in_vm`: on a kernel with soft-dirty it
//! runs here; on one without (these CI hosts) the whole binary runs once in the test VM
//! (scripts/vm) and each test asserts its own result from there. Never skipped. Only tests that
//! need soft-dirty belong in this file: all of them run in the VM on such hosts.

mod common;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};

/// The kernel these tests run on clears and sets the soft-dirty bit of a page (bit 55 of
/// /proc/self/pagemap) and CRIU agrees it can track memory: what `--track-mem` relies on.
#[test]
fn the_kernel_under_these_tests_tracks_dirty_pages() {
    if !common::vm::soft_dirty_here_or_in_vm("the_kernel_under_these_tests_tracks_dirty_pages") {
        return;
    }
    assert!(common::vm::kernel_tracks_dirty_pages(), "criu check --feature mem_dirty_track fails");
    const PAGE: usize = 4096;
    let mut buf = vec![1u8; 64 * PAGE];
    let soft_dirty = |buf: &[u8], i: usize| -> bool {
        let addr = buf.as_ptr() as usize + i * PAGE;
        let mut pagemap = File::open("/proc/self/pagemap").unwrap();
        pagemap.seek(SeekFrom::Start((addr / PAGE * 8) as u64)).unwrap();
        let mut entry = [0u8; 8];
        pagemap.read_exact(&mut entry).unwrap();
        u64::from_le_bytes(entry) & (1 << 55) != 0
    };
    // Clear every soft-dirty bit of this process, then write to one page only.
    OpenOptions::new().write(true).open("/proc/self/clear_refs").unwrap().write_all(b"4").unwrap();
    let before: Vec<bool> = (0..64).map(|i| soft_dirty(&buf, i)).collect();
    assert!(before.iter().all(|d| !d), "soft-dirty bits still set after clear_refs: {before:?}");
    buf[10 * PAGE] = 2;
    std::hint::black_box(&buf);
    let dirty: Vec<usize> = (0..64).filter(|&i| soft_dirty(&buf, i)).collect();
    assert_eq!(dirty, vec![10], "only the written page is soft-dirty");
    eprintln!("soft-dirty tracking works on {}", std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim());
}

const VERSIONED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/programs/versioned_memory.py");

fn versioned_yaml(env: &common::Env, kill: u16, port: u16, mib: u32, extra: &str) -> String {
    format!(
        "command: [\"/usr/bin/python3\", \"{VERSIONED}\", \"{}\"]\nuser: stasis-example\nkill_port: {kill}\nenvironment:\n  MIB: \"{mib}\"\n  PORT: \"{port}\"\n{extra}",
        env.path().display()
    )
}

/// A test's own environment with service `name` (`mib` MiB of versioned memory, `extra` keys)
/// cold-started: the environment, the service's port and its first check.
fn cold_started(name: &str, mib: u32, extra: &str) -> (common::Env, u16, String) {
    let env = common::Env::new();
    let [kill, port] = common::free_ports::<2>();
    env.write_service(name, &versioned_yaml(&env, kill, port, mib, extra));
    let started = env.start(name);
    assert_eq!(started["started_from"], "cold", "{started}");
    let first = check(port);
    assert!(first.starts_with(&format!("ok {} ", mib << 8)), "{first}");
    (env, port, first)
}

/// The service's own check of every page: `ok PAGES DIGEST` (the digest of every page's version).
fn check(port: u16) -> String {
    common::wait_for("the service to check its memory", || common::http(port, "GET", "/check", ""))
}

/// Rewrites `count` pages from `first`; the new digest.
fn write_pages(port: u16, first: u32, count: u32) -> String {
    common::http(port, "GET", &format!("/write/{first}/{count}"), "").expect("the service rewrote its pages")
}

/// `stasis checkpoint NAME --json`: the new checkpoint's id.
fn checkpoint(env: &common::Env, name: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["checkpoint", name, "--json"])).expect("checkpoint --json");
    v["checkpoint"].as_str().expect("a checkpoint id").to_string()
}

/// `stasis checkpoints NAME --json`: each row by id.
fn rows(env: &common::Env, name: &str) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["checkpoints", name, "--json"])).expect("checkpoints --json")
}

fn row<'a>(all: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    all["checkpoints"].as_array().unwrap().iter().find(|c| c["id"] == id).unwrap_or_else(|| panic!("{id} in {all}"))
}

fn ids(all: &serde_json::Value) -> Vec<String> {
    all["checkpoints"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect()
}

/// `stasis start NAME --from ID --json`.
fn start_from(env: &common::Env, name: &str, id: &str) -> serde_json::Value {
    env.adopt(name);
    serde_json::from_str(&env.ok(&["start", name, "--from", id, "--json"])).expect("start --json prints JSON")
}

/// The nftables tables (`CRIU-<run id>`) the dumps logged under `dir` would hold. The tests of
/// this binary run at once (in the VM too), so only a test's own tables tell what it left.
fn criu_tables_of(dir: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("grep").arg("-rhoa").arg("CRIU run id = [0-9a-f-]*").arg(dir).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.lines()
        .map(|l| format!("CRIU-{}", l.trim_start_matches("CRIU run id = ").chars().take(21).collect::<String>()))
        .collect()
}

fn nft_tables() -> String {
    let out = std::process::Command::new("nft").args(["list", "tables"]).output().expect("nft list tables");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Periodic-style keep-running dumps of a service with `checkpoint_every` chain: the first is
/// full, the next hold only the pages written since, each names its parent; and a restore of
/// every link brings back exactly the memory of that moment (every page checked, and the
/// versions of all of them, through the digest).
#[test]
fn an_incremental_chain_restores_at_every_link_with_the_right_memory() {
    if !common::vm::soft_dirty_here_or_in_vm("an_incremental_chain_restores_at_every_link_with_the_right_memory") {
        return;
    }
    let extra = "checkpoint_every: 1h\nfull_every: 8\nkeep_checkpoints: 10\n";
    let (env, port, d0) = cold_started("chain", 16, extra);
    let pages = 16 << 8;
    let c1 = checkpoint(&env, "chain");
    let d1 = write_pages(port, 0, 16);
    let c2 = checkpoint(&env, "chain");
    let d2 = write_pages(port, 1000, 64);
    let c3 = checkpoint(&env, "chain");
    let all = rows(&env, "chain");
    assert_eq!(row(&all, &c1)["parent"], serde_json::Value::Null, "the first is full: {all}");
    assert_eq!(row(&all, &c2)["parent"], c1.as_str(), "{all}");
    assert_eq!(row(&all, &c3)["parent"], c2.as_str(), "{all}");
    let written = |id: &str| row(&all, id)["timings"]["pages"].as_u64().unwrap_or_else(|| panic!("{all}"));
    assert!(written(&c1) >= pages, "the full one holds every page: {}", written(&c1));
    for c in [&c2, &c3] {
        assert!(written(c) * 4 < written(&c1), "{c} holds only what changed: {} of {}", written(c), written(&c1));
        assert_eq!(row(&all, c)["chain_problem"], serde_json::Value::Null, "{all}");
    }
    let log = env.log("chain");
    assert!(log.contains("incremental (only the pages written since the previous one)"), "{log}");
    assert!(
        log.contains(&format!("incremental: only the pages written since checkpoint {c2} (2 in its chain)")),
        "{log}"
    );
    env.ok(&["stop", "chain", "--no-checkpoint"]);
    for (id, at) in [(&c1, &d0), (&c2, &d1), (&c3, &d2)] {
        let started = start_from(&env, "chain", id);
        assert_eq!(started["started_from"], "checkpoint", "{id}: {started}");
        let now = check(port);
        assert!(now.ends_with(at.rsplit(' ').next().unwrap()), "{id}: the memory of its moment: {now} vs {at}");
        assert!(now.starts_with(&format!("ok {pages} ")), "{id}: every page right: {now}");
        env.ok(&["stop", "chain", "--no-checkpoint"]);
    }
    assert!(
        !env.service_dir("chain").join("checkpoints").join(&c3).join(".restore-flat").exists(),
        "the flat images are gone"
    );
    let ours = criu_tables_of(&env.state_dir());
    assert!(!ours.is_empty(), "the dumps logged their CRIU run ids");
    drop(env);
    let left = nft_tables();
    assert!(ours.iter().all(|t| !left.contains(t.as_str())), "no CRIU network-lock table of ours left behind: {left}");
}

/// The supervisor's own periodic checkpoints chain the same way: full, then `full_every`
/// incremental ones, then full again.
#[test]
fn periodic_checkpoints_are_incremental() {
    if !common::vm::soft_dirty_here_or_in_vm("periodic_checkpoints_are_incremental") {
        return;
    }
    let (env, _, _) = cold_started("ticking", 8, "checkpoint_every: 2s\nfull_every: 2\nkeep_checkpoints: 10\n");
    let all = common::wait_for("four periodic checkpoints", || {
        let all = rows(&env, "ticking");
        (all["checkpoints"].as_array().unwrap().len() >= 4).then_some(all)
    });
    env.ok(&["stop", "ticking", "--no-checkpoint"]);
    let taken = &all["checkpoints"].as_array().unwrap()[..4];
    let parents: Vec<&serde_json::Value> = taken.iter().map(|c| &c["parent"]).collect();
    let id = |i: usize| serde_json::Value::from(taken[i]["id"].as_str().unwrap());
    assert_eq!(parents, [&serde_json::Value::Null, &id(0), &id(1), &serde_json::Value::Null], "{all}");
    assert!(taken.iter().all(|c| c["kind"] == "periodic"), "{all}");
}

/// `full_every: 2`: two incremental checkpoints after a full one, then a full one again;
/// `keep_checkpoints: 1` keeps a kept checkpoint's parents (pinned) and lets a whole chain go
/// once a newer full one is kept; deleting a parent by hand is refused, naming its child; a
/// compressed chain restores.
#[test]
fn full_every_is_honoured_and_retention_keeps_parents() {
    if !common::vm::soft_dirty_here_or_in_vm("full_every_is_honoured_and_retention_keeps_parents") {
        return;
    }
    // Compressed: a restore reads every link's pages through zstd.
    let extra = "checkpoint_every: 1h\nfull_every: 2\nkeep_checkpoints: 1\ncompression: zstd\n";
    let (env, port, _) = cold_started("pinned", 8, extra);
    let mut taken = Vec::new();
    for i in 0..5 {
        write_pages(port, i * 10, 5);
        taken.push(checkpoint(&env, "pinned"));
        let all = rows(&env, "pinned");
        let want: Vec<String> = match i {
            // c1 full, c2 and c3 on it: all three needed by the newest.
            0..=2 => taken.clone(),
            // c4 full: the old chain goes; c5 on c4 keeps it.
            3 => vec![taken[3].clone()],
            _ => vec![taken[3].clone(), taken[4].clone()],
        };
        assert_eq!(ids(&all), want, "after checkpoint {}: {all}", i + 1);
    }
    let all = rows(&env, "pinned");
    assert_eq!(row(&all, &taken[3])["parent"], serde_json::Value::Null, "full after full_every incremental ones");
    assert_eq!(row(&all, &taken[4])["parent"], taken[3].as_str());
    let d = check(port);
    env.ok(&["stop", "pinned", "--no-checkpoint"]);
    let out = env.run(&["checkpoints", "pinned", "--delete", &taken[3], "--force"]);
    let refused = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{refused}");
    assert!(refused.contains(&format!("it is the parent of checkpoint {}", taken[4])), "{refused}");
    let started = start_from(&env, "pinned", &taken[4]);
    assert_eq!(started["started_from"], "checkpoint", "{started}");
    assert_eq!(check(port), d, "the newest link restores its memory");
    env.ok(&["stop", "pinned", "--no-checkpoint"]);
}

/// A flipped byte in a parent's pages: the child's restore verifies the whole chain, catches it,
/// names and quarantines the parent, and the start falls back (here to a cold start: the
/// parent was the only other checkpoint); `checkpoints` then says the child cannot be restored.
#[test]
fn a_damaged_parent_is_caught_and_its_children_are_not_restored() {
    if !common::vm::soft_dirty_here_or_in_vm("a_damaged_parent_is_caught_and_its_children_are_not_restored") {
        return;
    }
    let extra = "checkpoint_every: 1h\nkeep_checkpoints: 10\nrestore_stale: true\n";
    let (env, port, _) = cold_started("damaged", 8, extra);
    let parent = checkpoint(&env, "damaged");
    write_pages(port, 0, 8);
    let child = checkpoint(&env, "damaged");
    assert_eq!(row(&rows(&env, "damaged"), &child)["parent"], parent.as_str());
    env.ok(&["stop", "damaged", "--no-checkpoint"]);
    let images = env.service_dir("damaged").join("checkpoints").join(&parent).join("images");
    let (file, len) = std::fs::read_dir(&images)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| (e.path(), e.metadata().unwrap().len()))
        .filter(|(p, _)| p.file_name().unwrap().to_string_lossy().starts_with("pages-"))
        .max_by_key(|(_, l)| *l)
        .expect("a pages image");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&file).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, len / 2).unwrap();
        f.write_all_at(&[b[0] ^ 0x20], len / 2).unwrap();
    }
    let started = env.start("damaged");
    assert_eq!(started["started_from"], "cold", "{started}");
    let why = started["fallback_reason"].as_str().unwrap_or_default();
    assert!(why.contains(&format!("checkpoint {child} cannot be restored without its parent")), "{why}");
    assert!(why.contains(&format!("checkpoint {parent} failed verification")), "{why}");
    let all = rows(&env, "damaged");
    assert!(all["quarantined"].as_array().unwrap().iter().any(|q| q["id"] == parent.as_str()), "{all}");
    let problem = row(&all, &child)["chain_problem"].as_str().unwrap_or_default().to_string();
    assert!(problem.contains(&parent), "{all}");
    env.ok(&["stop", "damaged", "--no-checkpoint"]);
}

/// A stop of a service that keeps writing: a pre-dump first (while it runs), then the stopping
/// dump of only what changed since; the checkpoint holds both and restores every page right.
/// With `stop_pre_copy: false` the stop is one full dump.
#[test]
fn a_pre_copy_stop_of_a_service_that_keeps_writing_restores_every_page() {
    if !common::vm::soft_dirty_here_or_in_vm("a_pre_copy_stop_of_a_service_that_keeps_writing_restores_every_page") {
        return;
    }
    let env = common::Env::new();
    let [k1, p1, k2, p2] = common::free_ports::<4>();
    let writing = "environment:\n  WRITER: \"1\"\n";
    let yaml = versioned_yaml(&env, k1, p1, 32, "").replace("environment:\n", writing);
    env.write_service("precopy", &yaml);
    env.write_service(
        "plain",
        &(versioned_yaml(&env, k2, p2, 8, "").replace("environment:\n", writing) + "stop_pre_copy: false\n"),
    );
    let pages = 32 << 8;
    for (name, port) in [("precopy", p1), ("plain", p2)] {
        env.start(name);
        check(port);
    }
    let stopped: serde_json::Value = serde_json::from_str(&env.ok(&["stop", "precopy", "--json"])).unwrap();
    let id = stopped["checkpoint"].as_str().expect("a checkpoint").to_string();
    let all = rows(&env, "precopy");
    let c = row(&all, &id);
    assert_eq!(c["pre_copy"], true, "{c}");
    assert_eq!(c["parent"], serde_json::Value::Null, "complete by itself: {c}");
    let (pre, frozen) = (c["timings"]["pre_copy_pages"].as_u64().unwrap(), c["timings"]["pages"].as_u64().unwrap());
    assert!(pre >= pages, "the pre-dump copied the memory: {c}");
    assert!(frozen * 4 < pre, "the freeze dumped only what changed since: {frozen} of {pre}");
    let log = env.log("precopy");
    assert!(log.contains(&format!("pre-copy: {pre} pages copied in ")), "{log}");
    let started = env.start("precopy");
    assert_eq!(started["started_from"], "checkpoint", "{started}");
    let now = check(p1);
    assert!(now.starts_with(&format!("ok {pages} ")), "every page right: {now}");
    env.ok(&["stop", "precopy", "--no-checkpoint"]);

    let stopped: serde_json::Value = serde_json::from_str(&env.ok(&["stop", "plain", "--json"])).unwrap();
    let all = rows(&env, "plain");
    let c = row(&all, stopped["checkpoint"].as_str().unwrap());
    assert_eq!(c["pre_copy"], false, "stop_pre_copy: false: {c}");
    assert_eq!(env.start("plain")["started_from"], "checkpoint");
    assert!(check(p2).starts_with(&format!("ok {} ", 8 << 8)));
    env.ok(&["stop", "plain", "--no-checkpoint"]);
}
