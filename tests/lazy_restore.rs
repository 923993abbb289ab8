//! `restore: lazy`: the service resumes as soon as its processes exist and its memory comes in
//! from the checkpoint afterwards, through CRIU's lazy-pages daemon whose pages stasis serves,
//! each chunk checked first (criu::lazy). Every byte ends up right (a program that fills its
//! memory with a pattern of its own per page checks it after the restore), plain, compressed
//! and encrypted; a flipped byte in the pages means the restored tree is killed, never run on a
//! bad page; and the daemon killed at random moments under load never leaves the service
//! running on zeros: it either finished first, or the tree is killed and cold-started.
//!
//! These tests need the CRIU that scripts/setup builds, with userfaultfd (they fail without).

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/programs/pattern_memory.py");

fn yaml(env: &Env, kill: u16, port: u16, mib: u32, extra: &str) -> String {
    format!(
        "command: [\"/usr/bin/python3\", \"{SCRIPT}\", \"{}\"]\nuser: stasis-example\nkill_port: {kill}\nrestore: lazy\nenvironment:\n  MIB: \"{mib}\"\n  PORT: \"{port}\"\n{extra}",
        env.path().display()
    )
}

/// The service's token: it answers without touching its memory.
fn token(port: u16) -> String {
    wait_for("the service to answer", || http(port, "GET", "/", ""))
}

/// The service's own check of every page of its memory.
fn check(port: u16) -> String {
    wait_for("the service to check its memory", || http(port, "GET", "/check", ""))
}

/// `stop --json`: the checkpoint's id and directory.
fn stop(env: &Env, name: &str) -> (String, PathBuf) {
    let v: Value = serde_json::from_str(&env.ok(&["stop", name, "--json"])).expect("stop --json");
    let id = v["checkpoint"].as_str().expect("a checkpoint").to_string();
    let dir = env.service_dir(name).join("checkpoints").join(&id);
    (id, dir)
}

/// The restore of the checkpoint in `dir` was a lazy one, and its daemon was served by stasis.
fn assert_lazy(dir: &Path) {
    let log = std::fs::read_to_string(dir.join("lazy-pages.log")).expect("the lazy-pages daemon's log");
    assert!(log.contains("Reusing ps socket"), "the daemon took its pages from stasis's socket:\n{log}");
    assert!(!dir.join("lazy-pages.socket").exists(), "the daemon's socket name is gone");
    assert!(!dir.join(".restore-lazy").exists(), "the plain images are gone");
}

/// The lazy-pages daemons serving the restore of the checkpoint in `dir`: criu processes whose
/// command line is `lazy-pages` with that work directory.
fn daemons(dir: &Path) -> Vec<i32> {
    let marker = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("criu") && cmdline.contains(" lazy-pages ") && cmdline.contains(&marker) && !is_gone(pid) {
            out.push(pid);
        }
    }
    out
}

/// Waits until the daemon of the restore of `dir` is gone, having transferred every page.
fn complete(dir: &Path) {
    wait_for("the lazy-pages daemon to finish", || daemons(dir).is_empty().then_some(()));
    let log = std::fs::read_to_string(dir.join("lazy-pages.log")).unwrap_or_default();
    let done: Vec<&str> = log.lines().filter(|l| l.contains("UFFD transferred pages")).collect();
    assert!(!done.is_empty(), "the daemon summed up its transfer:\n{log}");
    for l in done {
        let (sent, total) = l.rsplit_once('(').unwrap().1.trim_end_matches(')').split_once('/').unwrap();
        assert_eq!(sent, total, "every page of each process was transferred: {l}");
    }
}

fn key_file(env: &Env) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = env.path().join("keys");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("lazy.key");
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
    std::fs::write(&key, bytes).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    key
}

#[test]
fn a_lazy_restore_ends_with_every_byte_right() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("lazy", &yaml(&env, kill, port, 64, ""));
    assert_eq!(env.start("lazy")["started_from"], "cold");
    let before = token(port);
    assert_eq!(check(port), format!("ok {}", 64 << 8));
    let (id, dir) = stop(&env, "lazy");
    let started = env.start("lazy");
    assert_eq!(started["started_from"], "checkpoint", "{started}");
    assert_eq!(started["checkpoint"], id.as_str());
    assert_eq!(token(port), before, "the same service");
    assert_eq!(check(port), format!("ok {}", 64 << 8), "every page right");
    complete(&dir);
    assert_lazy(&dir);
    env.ok(&["stop", "lazy"]);
}
