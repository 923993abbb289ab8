//! Root never opens what the service controls: a FIFO or a symlink to /dev/zero planted beside a
//! mapped file whose name has two spaces (at stop, and in place of a recorded file at start), a
//! FIFO held open in /dev/shm, and a sparse 96 MiB shm file. Each stasis command runs under a
//! watchdog that SIGKILLs only its own child, so a regression fails instead of hanging.

use super::common::*;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

const DUMP_TIMEOUT_S: u64 = 20;
/// How long past `dump_timeout` the watchdog lets a command run before it counts as hung.
const WATCHDOG_MARGIN: Duration = Duration::from_secs(30);
/// Generous: only "it ended around dump_timeout at the latest", never a speed judgement.
const RETURN_MARGIN: Duration = Duration::from_secs(15);

/// Runs stasis; past `limit` its own child is SIGKILLed (through the Child handle: never a pid
/// that could have been reused) and the test fails saying so.
fn run_bounded(env: &Env, args: &[&str], limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = env.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn stasis");
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "stasis {args:?} hung for {limit:?} and was killed; it printed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    eprintln!(
        "$ stasis {}\n  exit {:?} after {took:?}\n  {}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    (out, took)
}

fn limit() -> Duration {
    Duration::from_secs(DUMP_TIMEOUT_S) + WATCHDOG_MARGIN
}

/// A directory the service user owns, for the files it plants.
fn service_owned_dir(env: &Env, name: &str) -> PathBuf {
    let dir = env.path().join(format!("{name}-files"));
    std::fs::create_dir(&dir).unwrap();
    let uid = uid_of_user("stasis-example");
    std::os::unix::fs::chown(&dir, Some(uid), None).unwrap();
    dir
}

fn decoy_yaml(dir: &Path, kill_port: u16, decoy: &str, shm: Option<(&str, &str)>) -> String {
    let mut y = format!(
        "command: [\"/usr/bin/python3\", \"{REPO}/tests/programs/decoy_files.py\"]\nuser: stasis-example\nkill_port: {kill_port}\ndump_timeout: {DUMP_TIMEOUT_S}s\nrestore_timeout: {DUMP_TIMEOUT_S}s\nenvironment:\n  DIR: \"{}\"\n  DECOY: \"{decoy}\"\n",
        dir.display()
    );
    if let Some((name, kind)) = shm {
        y.push_str(&format!("  SHM: \"{name}\"\n  SHM_KIND: \"{kind}\"\n"));
    }
    y
}

/// Starts `name` and waits until its program has planted everything.
fn start_planted(env: &Env, name: &str, dir: &Path) {
    let _ = std::fs::remove_file(dir.join("ready"));
    env.start(name);
    wait_for("the service's files in place", || dir.join("ready").exists().then_some(()));
}

fn newest_checkpoint(env: &Env, name: &str) -> PathBuf {
    env.checkpoint_dirs(name)
        .into_iter()
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .last()
        .expect("a checkpoint")
}

fn manifest(cp: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(cp.join("manifest.json")).unwrap()).unwrap()
}

/// Bytes the files under `dir` occupy on disk (allocated blocks, not their apparent size).
fn allocated(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let m = e.path().symlink_metadata().unwrap();
        total += if m.is_dir() { allocated(&e.path()) } else { m.blocks() * 512 };
    }
    total
}

/// A /dev/shm entry of this test's, removed at the end whatever happens.
struct ShmName(String);
impl ShmName {
    fn new(what: &str) -> ShmName {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        ShmName(format!("stasis-test-{what}-{}-{nanos}", std::process::id()))
    }
    fn path(&self) -> PathBuf {
        Path::new("/dev/shm").join(&self.0)
    }
}
impl Drop for ShmName {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path());
    }
}

fn decoy_at_stop(decoy: &str) {
    let env = Env::new();
    let [kill_a, kill_b] = free_ports::<2>();
    let (a, b) = (format!("decoy-{decoy}"), "bystander".to_string());
    let (dir_a, dir_b) = (service_owned_dir(&env, &a), service_owned_dir(&env, &b));
    env.write_service(&a, &decoy_yaml(&dir_a, kill_a, decoy, None));
    env.write_service(&b, &decoy_yaml(&dir_b, kill_b, "none", None));
    start_planted(&env, &a, &dir_a);
    start_planted(&env, &b, &dir_b);

    let (out, took) = run_bounded(&env, &["stop", &a], limit());
    assert_eq!(out.status.code(), Some(0), "the stop succeeds: the decoy is never opened");
    assert!(took < Duration::from_secs(DUMP_TIMEOUT_S) + RETURN_MARGIN, "returned after {took:?}");
    // The mapped file is recorded under its real name, two spaces and all.
    let m = manifest(&newest_checkpoint(&env, &a));
    let real = dir_a.join("lib  x.so").display().to_string();
    let paths: Vec<&str> = m["executables"].as_array().unwrap().iter().filter_map(|e| e["path"].as_str()).collect();
    assert!(paths.contains(&real.as_str()), "{paths:?}");
    assert!(!paths.contains(&dir_a.join("lib x.so").display().to_string().as_str()), "{paths:?}");

    // The dump slot was given back: another service of the same host stops.
    let (out, _) = run_bounded(&env, &["stop", &b], limit());
    assert_eq!(out.status.code(), Some(0), "the second service stops too");
}

#[test]
fn a_fifo_beside_a_two_space_name_does_not_hold_the_stop() {
    decoy_at_stop("fifo");
}

#[test]
fn a_dev_zero_symlink_beside_a_two_space_name_does_not_hold_the_stop() {
    decoy_at_stop("zero");
}

fn decoy_at_start(decoy: &str) {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let name = format!("swapped-{decoy}");
    let dir = service_owned_dir(&env, &name);
    env.write_service(&name, &decoy_yaml(&dir, kill, "none", None));
    start_planted(&env, &name, &dir);
    let (out, _) = run_bounded(&env, &["stop", &name], limit());
    assert_eq!(out.status.code(), Some(0));
    let cp = newest_checkpoint(&env, &name);

    // While it is stopped, the service user swaps a file the manifest records for a decoy.
    let recorded = dir.join("lib  x.so");
    std::fs::remove_file(&recorded).unwrap();
    match decoy {
        "fifo" => nix::unistd::mkfifo(&recorded, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap(),
        _ => std::os::unix::fs::symlink("/dev/zero", &recorded).unwrap(),
    }
    let _ = std::fs::remove_file(dir.join("ready"));
    env.adopt(&name);
    let (out, took) = run_bounded(&env, &["start", &name], limit());
    assert!(took < Duration::from_secs(DUMP_TIMEOUT_S) + RETURN_MARGIN, "returned after {took:?}");
    // Fail closed on that checkpoint: kept, marked incompatible, naming the path (not quarantined).
    let why = std::fs::read_to_string(cp.join("incompatible.txt")).expect("the checkpoint is marked incompatible");
    let kind = if decoy == "fifo" { "a FIFO, not a regular file" } else { "symbolic link" };
    assert!(why.contains(&recorded.display().to_string()) && why.contains(kind), "{why}");
    assert!(cp.exists(), "the checkpoint itself is fine and kept");
    assert_eq!(out.status.code(), Some(0), "on_incompatible: cold starts the service afresh");
}

#[test]
fn a_recorded_file_swapped_for_a_fifo_fails_the_checkpoint_closed_at_start() {
    decoy_at_start("fifo");
}

#[test]
fn a_recorded_file_swapped_for_a_dev_zero_symlink_fails_the_checkpoint_closed_at_start() {
    decoy_at_start("zero");
}

#[test]
fn a_fifo_held_open_in_dev_shm_does_not_hold_the_stop() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let shm = ShmName::new("fifo");
    let name = "shm-fifo";
    let dir = service_owned_dir(&env, name);
    env.write_service(name, &decoy_yaml(&dir, kill, "none", Some((&shm.0, "fifo"))));
    start_planted(&env, name, &dir);
    assert!(std::fs::symlink_metadata(shm.path()).unwrap().file_type().is_fifo());

    let (out, took) = run_bounded(&env, &["stop", name], limit());
    assert_eq!(out.status.code(), Some(0), "the FIFO is left to CRIU, never opened for a copy");
    assert!(took < Duration::from_secs(DUMP_TIMEOUT_S), "returned after {took:?}, not at dump_timeout");
    let m = manifest(&newest_checkpoint(&env, name));
    assert!(m["shm_files"].as_array().is_none_or(|v| v.is_empty()), "{}", m["shm_files"]);
}

#[test]
fn a_sparse_96_mib_shm_file_makes_a_small_checkpoint_and_comes_back_sparse() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let shm = ShmName::new("sparse");
    let name = "shm-sparse";
    let dir = service_owned_dir(&env, name);
    env.write_service(name, &decoy_yaml(&dir, kill, "none", Some((&shm.0, "sparse"))));
    start_planted(&env, name, &dir);

    let (out, _) = run_bounded(&env, &["stop", name], limit());
    assert_eq!(out.status.code(), Some(0));
    let cp = newest_checkpoint(&env, name);
    let on_disk = allocated(&cp);
    eprintln!("checkpoint {} occupies {on_disk} bytes", cp.display());
    assert!(on_disk < 32 << 20, "the holes stay holes: {on_disk} bytes allocated");
    let m = manifest(&cp);
    assert_eq!(m["shm_files"][0]["size"], 96 << 20, "{}", m["shm_files"]);

    // As after a reboot: the file is gone, and put back from the copy, sparse, with its data.
    std::fs::remove_file(shm.path()).unwrap();
    let (out, _) = run_bounded(&env, &["start", name], limit());
    assert_eq!(out.status.code(), Some(0));
    let meta = std::fs::metadata(shm.path()).unwrap();
    assert_eq!(meta.len(), 96 << 20);
    assert!(meta.blocks() * 512 < 32 << 20, "put back sparse: {} bytes allocated", meta.blocks() * 512);
    let mut marker = [0u8; 13];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(shm.path()).unwrap(), &mut marker, 40 << 20)
        .unwrap();
    assert_eq!(&marker, b"sparse-marker");
}
