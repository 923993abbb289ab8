//! A restore checks the images as CRIU reads them (CRIU's image-streamer protocol): no pass
//! over every image before CRIU starts, and the restored tree resumes only once every byte it
//! was given checked out. A flipped byte in any kind of image is caught during the restore:
//! the checkpoint is quarantined, the start falls back, the reason names the file and the
//! offset, and the tree that was being restored never runs (the service's beacon with the old
//! token never comes, and the only process of it afterwards is the cold-started one). Intact
//! checkpoints, compressed, encrypted and imported ones restore streamed with their memory;
//! missing or damaged chunk hashes only cost a read, and the log says so.
//!
//! These tests need the CRIU that scripts/setup builds (with
//! scripts/criu-patches/0003-rpc-image-streamer.patch): each asserts that the restore was
//! streamed, so with another CRIU they fail rather than pass for the wrong reason.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/programs/beacon_memory.py");
const GROUP: u64 = 1 << 20;
/// Enough memory for a pages image of many 1 MiB groups.
const MIB: u32 = 24;

/// The UDP socket the service's beacons come to.
struct Beacons(UdpSocket);

impl Beacons {
    fn new() -> (Beacons, u16) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let port = s.local_addr().unwrap().port();
        (Beacons(s), port)
    }

    /// The tokens of every beacon that comes within `d` (and of those already waiting).
    fn tokens_within(&self, d: Duration) -> BTreeSet<String> {
        let until = Instant::now() + d;
        let mut out = BTreeSet::new();
        let mut buf = [0u8; 256];
        loop {
            match self.0.recv(&mut buf) {
                Ok(n) => {
                    if let Some(t) = String::from_utf8_lossy(&buf[..n]).split_whitespace().next() {
                        out.insert(t.to_string());
                    }
                }
                Err(_) if Instant::now() >= until => return out,
                Err(_) => {}
            }
        }
    }
}

fn yaml(env: &Env, kill: u16, port: u16, beacon: u16, extra: &str) -> String {
    format!(
        "command: [\"/usr/bin/python3\", \"{SCRIPT}\", \"{}\"]\nuser: stasis-example\nkill_port: {kill}\nenvironment:\n  MIB: \"{MIB}\"\n  PORT: \"{port}\"\n  BEACON: \"{beacon}\"\n{extra}",
        env.path().display()
    )
}

/// The service's token and the SHA-256 of its memory.
fn memory(port: u16) -> (String, String) {
    let body = wait_for("the service to answer", || http(port, "GET", "/", ""));
    let (t, d) = body.trim().split_once(' ').expect("TOKEN SHA256");
    (t.to_string(), d.to_string())
}

/// `stop --json`: the checkpoint's id and directory.
fn stop(env: &Env, name: &str) -> (String, PathBuf) {
    let v: Value = serde_json::from_str(&env.ok(&["stop", name, "--json"])).expect("stop --json");
    let id = v["checkpoint"].as_str().expect("a checkpoint").to_string();
    let dir = env.service_dir(name).join("checkpoints").join(&id);
    (id, dir)
}

/// The processes of this test's services: every python running the script with the env's path.
fn processes(env: &Env) -> Vec<i32> {
    let marker = env.path().display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // The python itself, not the namespace init whose arguments name the command too.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "python3" && cmdline.contains(SCRIPT) && cmdline.contains(&marker) && !is_gone(pid) {
            out.push(pid);
        }
    }
    out
}

/// An environment whose restores are all streamed: a small plain checkpoint would otherwise be
/// verified in a pass before CRIU runs (`restore: {verify_first_below}` in the host config).
fn streaming_env() -> Env {
    let env = Env::new();
    std::fs::write(env.path().join("stasis.yaml"), "restore: {verify_first_below: 0}\n").unwrap();
    env
}

/// The restore of the checkpoint in `dir` (its work directory) was a streamed one.
fn assert_streamed(dir: &Path) {
    let conf = std::fs::read_to_string(dir.join("criu-restore.conf")).expect("CRIU's restore config is kept");
    assert!(
        conf.lines().any(|l| l.trim() == "stream"),
        "the restore was not streamed: the CRIU in use cannot be served images (scripts/setup builds CRIU with scripts/criu-patches/0003-rpc-image-streamer.patch); {}:\n{conf}",
        dir.join("criu-restore.conf").display()
    );
    let log = std::fs::read_to_string(dir.join("restore.log")).expect("restore.log");
    assert!(
        log.contains("Running pre-stream scripts"),
        "CRIU was served its images (its log shows the pre-stream notification)"
    );
}

fn images(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir.join("images"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
        .collect();
    v.sort();
    v
}

/// The largest image whose name starts with `prefix` and ends with `suffix`.
fn largest(dir: &Path, prefix: &str, suffix: &str) -> (String, u64) {
    images(dir)
        .into_iter()
        .filter(|(n, _)| n.starts_with(prefix) && n.ends_with(suffix))
        .max_by_key(|(_, len)| *len)
        .unwrap_or_else(|| panic!("a {prefix}*{suffix} in {}: {:?}", dir.display(), images(dir)))
}

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], offset).unwrap();
    f.sync_all().unwrap();
}

fn quarantine_of(env: &Env, name: &str, id: &str) -> PathBuf {
    std::fs::read_dir(env.service_dir(name).join("quarantine"))
        .unwrap_or_else(|e| panic!("{name} has a quarantine ({e})"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(id))
        .unwrap_or_else(|| panic!("{id} is quarantined"))
}

#[test]
fn an_intact_checkpoint_is_restored_streamed_with_its_memory() {
    let env = streaming_env();
    let (beacons, beacon) = Beacons::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("intact", &yaml(&env, kill, port, beacon, ""));
    assert_eq!(env.start("intact")["started_from"], "cold");
    let before = memory(port);
    let (id, dir) = stop(&env, "intact");
    let (pages, len) = largest(&dir, "pages-", ".img");
    assert!(len > 8 * GROUP, "{pages}: {len} bytes");
    assert!(dir.join("chunks").join(format!("{pages}.cv")).is_file(), "the finalize wrote its chunk hashes");

    let started = env.start("intact");
    assert_eq!(started["started_from"], "checkpoint", "{started}");
    assert_eq!(started["checkpoint"], id.as_str());
    assert_eq!(memory(port), before, "the same token and the same memory");
    assert!(beacons.tokens_within(Duration::from_millis(300)).contains(&before.0), "the restored tree runs");
    assert_streamed(&dir);
    // CRIU's own local files land in the checkpoint's directory, as before.
    assert!(dir.join("stats-restore").is_file(), "stats-restore is written");
    assert!(!dir.join(".restore-stream").exists(), "the streamer's directory is gone");
    assert!(started["warnings"].as_array().is_none_or(|w| w.is_empty()), "nothing to say: {started}");
    env.ok(&["stop", "intact"]);
}

#[test]
fn compressed_and_encrypted_checkpoints_are_restored_streamed() {
    let env = streaming_env();
    let (beacons, beacon) = Beacons::new();
    let [k1, p1, k2, p2] = free_ports::<4>();
    let key = key_file(&env, "streamed");
    env.write_service("squeezed", &yaml(&env, k1, p1, beacon, "compression: zstd\n"));
    env.write_service(
        "vault",
        &yaml(&env, k2, p2, beacon, &format!("compression: zstd\nencryption_key_file: {}\n", key.display())),
    );
    for (name, port, stored) in [("squeezed", p1, ".img.zst"), ("vault", p2, ".img.zst.enc")] {
        env.start(name);
        let before = memory(port);
        let (_, dir) = stop(&env, name);
        let (pages, len) = largest(&dir, "pages-", stored);
        assert!(len > 8 * GROUP, "{pages}: {len} bytes (random memory does not compress)");
        assert!(dir.join("chunks").join(format!("{pages}.cv")).is_file(), "chunk hashes of the stored bytes");
        let started = env.start(name);
        assert_eq!(started["started_from"], "checkpoint", "{name}: {started}");
        assert_eq!(memory(port), before, "{name}: the same memory");
        assert!(beacons.tokens_within(Duration::from_millis(300)).contains(&before.0), "{name} runs");
        assert_streamed(&dir);
        assert!(!dir.join(".restore-images").exists(), "{name}: no plain copy of the images was written");
        env.ok(&["stop", name]);
    }
}

#[test]
fn a_flipped_byte_in_any_image_is_caught_during_the_restore_and_the_tree_never_resumes() {
    let env = streaming_env();
    let (beacons, beacon) = Beacons::new();
    let [k1, p1, k2, p2, k3, p3] = free_ports::<6>();
    let key = key_file(&env, "streamed");
    env.write_service("plain", &yaml(&env, k1, p1, beacon, ""));
    env.write_service("squeezed", &yaml(&env, k2, p2, beacon, "compression: zstd\n"));
    env.write_service("vault", &yaml(&env, k3, p3, beacon, &format!("encryption_key_file: {}\n", key.display())));
    // (service, port, what, prefix, suffix): the largest such image gets a flipped byte.
    let cases: [(&str, u16, &str, &str, &str); 9] = [
        ("plain", p1, "memory pages", "pages-", ".img"),
        ("plain", p1, "a process's core", "core-", ".img"),
        ("plain", p1, "a process's memory map", "mm-", ".img"),
        ("plain", p1, "a page map", "pagemap-", ".img"),
        ("plain", p1, "the open files", "files", ".img"),
        ("plain", p1, "the inventory", "inventory", ".img"),
        ("squeezed", p2, "compressed memory pages", "pages-", ".img.zst"),
        ("vault", p3, "sealed memory pages", "pages-", ".img.enc"),
        ("vault", p3, "a sealed core", "core-", ".img.enc"),
    ];
    for (name, port, what, prefix, suffix) in cases {
        eprintln!("--- {what} ({name})");
        assert_eq!(env.start(name)["started_from"], "cold", "{what}");
        let (old, _) = memory(port);
        let (id, dir) = stop(&env, name);
        assert!(processes(&env).is_empty(), "{what}: stopped");
        let (file, len) = largest(&dir, prefix, suffix);
        let at = len / 2 + 1;
        flip_byte(&dir.join("images").join(&file), at);
        let group = at / GROUP * GROUP;

        beacons.tokens_within(Duration::ZERO);
        let started = env.start(name);
        let seen = beacons.tokens_within(Duration::from_millis(500));
        assert_eq!(started["started_from"], "cold", "{what}: not restored: {started}");
        let reason = started["fallback_reason"].as_str().unwrap_or_else(|| panic!("{what}: a reason: {started}"));
        assert!(reason.contains(&id), "{what}: names the checkpoint: {reason}");
        assert!(reason.contains(&format!("images/{file}")), "{what}: names images/{file}: {reason}");
        assert!(reason.contains("during the restore"), "{what}: caught as CRIU read it: {reason}");
        assert!(reason.contains(&format!("bytes {group} to ")), "{what}: names the offset {group}: {reason}");
        assert!(!seen.contains(&old), "{what}: the tree being restored never ran (its beacon came)");
        let q = quarantine_of(&env, name, &id);
        assert!(q.join("quarantine-reason.txt").is_file(), "{what}: quarantined with the reason");
        assert_streamed(&q);
        // The only process of the service is the cold-started one, with a token of its own.
        let (new, _) = memory(port);
        assert_ne!(new, old, "{what}: a cold start");
        let running = processes(&env);
        let shown: Vec<String> =
            running.iter().map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default()).collect();
        assert_eq!(running.len(), 1, "{what}: one process of the service: {shown:#?}");
        let init = pid_in(&env.status(name)["init_pid"]).unwrap();
        let parent = std::fs::read_to_string(format!("/proc/{}/stat", running[0])).unwrap();
        let ppid: i32 = parent.rsplit_once(')').unwrap().1.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(ppid, init, "{what}: it is the cold start's");
        assert!(beacons.tokens_within(Duration::from_millis(200)).iter().all(|t| *t != old), "{what}: still none");
        env.ok(&["stop", name, "--no-checkpoint"]);
    }
}

#[test]
fn missing_or_damaged_chunk_hashes_are_computed_again_and_the_log_says_so() {
    let env = streaming_env();
    let (_beacons, beacon) = Beacons::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("sidecar", &yaml(&env, kill, port, beacon, ""));
    env.start("sidecar");
    for (how, damage) in [
        ("missing", (|p: &Path| std::fs::remove_file(p).unwrap()) as fn(&Path)),
        ("damaged", |p: &Path| flip_byte(p, std::fs::metadata(p).unwrap().len() - 7)),
    ] {
        let before = memory(port);
        let (_, dir) = stop(&env, "sidecar");
        let (pages, _) = largest(&dir, "pages-", ".img");
        damage(&dir.join("chunks").join(format!("{pages}.cv")));
        let started = env.start("sidecar");
        assert_eq!(started["started_from"], "checkpoint", "{how}: restored all the same: {started}");
        assert_eq!(memory(port), before, "{how}: the same memory");
        assert_streamed(&dir);
        let said = format!("images/{pages}: its chunk hashes are {how}");
        let warnings = started["warnings"].to_string();
        assert!(warnings.contains(&said), "{how}: start says {said:?}: {warnings}");
        assert!(env.log("sidecar").contains(&said), "{how}: the service log says {said:?}");
    }
    env.ok(&["stop", "sidecar"]);
}

#[test]
fn an_imported_checkpoint_brings_its_chunk_hashes_and_restores_streamed() {
    let env = streaming_env();
    let (_beacons, beacon) = Beacons::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("moved", &yaml(&env, kill, port, beacon, ""));
    env.start("moved");
    let before = memory(port);
    let (id, dir) = stop(&env, "moved");
    let archive = env.path().join("moved.tar.zst");
    env.ok(&["export", "moved", &id, "-o", archive.to_str().unwrap()]);
    // The archive carries images, not chunk hashes: take them away here to see the import's.
    std::fs::remove_dir_all(dir.join("chunks")).unwrap();
    let imported: Value = serde_json::from_str(&env.ok(&["import", archive.to_str().unwrap(), "--json"])).unwrap();
    let new = imported["checkpoint"].as_str().unwrap().to_string();
    let new_dir = env.service_dir("moved").join("checkpoints").join(&new);
    let (pages, _) = largest(&new_dir, "pages-", ".img");
    assert!(new_dir.join("chunks").join(format!("{pages}.cv")).is_file(), "the import wrote the chunk hashes");
    let started = env.start("moved");
    assert_eq!(started["checkpoint"], new.as_str(), "{started}");
    assert_eq!(memory(port), before);
    assert_streamed(&new_dir);
    assert!(started["warnings"].as_array().is_none_or(|w| w.is_empty()), "the sidecars were used: {started}");
    env.ok(&["stop", "moved"]);
}
