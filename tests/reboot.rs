//! What a reboot or a crash leaves behind must not cost a healthy checkpoint: the directory of
//! a unix socket under /run comes back before the restore; a file the service writes that grew
//! after the checkpoint is cut back to what the memory expects, with the added bytes kept
//! beside it; a file changed where no copy was kept is refused, naming it, and the checkpoint
//! is kept; a restore failing because of the host keeps the checkpoint for the next start.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// A directory of /run for one test, removed whatever happens.
struct RunDir(PathBuf);

impl RunDir {
    fn new(owner: &str) -> RunDir {
        let p = PathBuf::from(format!("/run/stasis-test-{:016x}", rand_u64()));
        std::fs::create_dir(&p).unwrap();
        let uid = uid_of_user(owner);
        std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
        RunDir(p)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).unwrap();
    u64::from_le_bytes(b)
}

fn redis_sock(sock: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("redis-cli").arg("-s").arg(sock).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn a_reboot_that_emptied_run_restores_redis_with_its_socket_and_keys() {
    let env = Env::new();
    let run = RunDir::new("redis");
    let sock = run.0.join("redis.sock");
    let [port, kill] = free_ports::<2>();
    env.write_service(
        "redis",
        &format!(
            "command: [\"/usr/bin/redis-server\", \"--port\", \"{port}\", \"--bind\", \"127.0.0.1\", \"--unixsocket\", \"{}\", \"--unixsocketperm\", \"770\", \"--save\", \"\", \"--appendonly\", \"no\"]\nuser: redis\nkill_port: {kill}\n",
            sock.display()
        ),
    );
    env.start("redis");
    wait_for("redis on its unix socket", || redis_sock(&sock, &["PING"]).filter(|r| r == "PONG"));
    for i in 0..200 {
        redis_sock(&sock, &["SET", &format!("k{i}"), &format!("v{i}")]).unwrap();
    }
    env.ok(&["stop", "redis"]);
    let cp = env.checkpoint_dirs("redis").pop().unwrap();
    let dirs = manifest(&cp)["tmpfs_dirs"].clone();
    assert_eq!(dirs[0]["path"], run.0.display().to_string(), "{dirs}");
    assert_eq!(dirs[0]["uid"], uid_of_user("redis"));
    // What a reboot does to /run (and to /dev/shm).
    std::fs::remove_dir_all(&run.0).unwrap();
    let started = env.start("redis");
    assert_eq!(started["started_from"], "checkpoint", "{started}");
    let warned = started["warnings"].to_string();
    assert!(warned.contains(&run.0.display().to_string()) && warned.contains("recreated"), "{warned}");
    let meta = std::fs::metadata(&run.0).unwrap();
    assert_eq!(
        (std::os::unix::fs::MetadataExt::uid(&meta), meta.permissions().mode_bits()),
        (uid_of_user("redis"), 0o750)
    );
    wait_for("redis on its unix socket again", || redis_sock(&sock, &["PING"]).filter(|r| r == "PONG"));
    assert_eq!(redis_sock(&sock, &["DBSIZE"]).as_deref(), Some("200"), "every key survived");
    assert_eq!(redis_sock(&sock, &["GET", "k199"]).as_deref(), Some("v199"));
    assert!(!env.service_dir("redis").join("quarantine").exists(), "nothing quarantined");
    env.ok(&["stop", "redis"]);
}

trait ModeBits {
    fn mode_bits(&self) -> u32;
}

impl ModeBits for std::fs::Permissions {
    fn mode_bits(&self) -> u32 {
        std::os::unix::fs::PermissionsExt::mode(self) & 0o7777
    }
}

/// A directory the service user writes in, and the numbered-lines job writing `out.txt` there.
fn job(env: &Env, name: &str, kill: u16, pad: Option<usize>, extra: &str) -> PathBuf {
    let data = env.path().join(format!("{name}-data"));
    std::fs::create_dir(&data).unwrap();
    let uid = uid_of_user("stasis-example");
    std::os::unix::fs::chown(&data, Some(uid), Some(uid)).unwrap();
    let out = data.join("out.txt");
    let pad = pad.map(|p| format!(", \"{p}\"")).unwrap_or_default();
    env.write_service(
        name,
        &format!(
            "command: [\"/usr/bin/python3\", \"{REPO}/tests/programs/numbered_lines.py\", \"lines\", \"{}\"{pad}]\nuser: stasis-example\nkill_port: {kill}\n{extra}",
            out.display()
        ),
    );
    out
}

/// The numbers of the complete lines of `path` (a first line of '#' padding left out).
fn numbers(path: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.parse().unwrap_or_else(|_| panic!("line {l:?}")))
        .collect()
}

fn consecutive_from(v: &[u64], first: u64) -> bool {
    v.iter().enumerate().all(|(i, n)| *n == first + i as u64)
}

/// The files `NAME.stasis-after-*` beside `path`.
fn kept_beside(path: &Path, what: &str) -> Vec<PathBuf> {
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    let mut v: Vec<PathBuf> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&format!("{name}.stasis-{what}-")))
        .collect();
    v.sort();
    v
}

#[test]
fn a_job_killed_after_a_periodic_checkpoint_continues_its_file_with_no_line_lost_or_doubled() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let extra = "checkpoint_every: 2s\nrestart: on-failure\nrestart_from: checkpoint\nrestart_backoff: 100ms\n";
    let out = job(&env, "batch", kill, None, extra);
    env.start("batch");
    let cp = wait_for("a periodic checkpoint", || {
        let v: serde_json::Value = serde_json::from_str(&env.ok(&["checkpoints", "batch", "--json"])).unwrap();
        let id = v["checkpoints"].as_array()?.last()?["id"].as_str()?.to_string();
        Some(env.service_dir("batch").join("checkpoints").join(id))
    });
    let recorded = manifest(&cp)["written_files"].clone();
    assert_eq!(recorded[0]["path"], out.display().to_string(), "{recorded}");
    let at_checkpoint = recorded[0]["size"].as_u64().unwrap();
    // The job writes on after the checkpoint; then it dies.
    wait_for("lines after the checkpoint", || {
        (std::fs::metadata(&out).unwrap().len() > at_checkpoint + 100).then_some(())
    });
    let pid = pid_in(&env.status("batch")["pid"]).unwrap();
    verified_kill(pid, &["numbered_lines.py", out.to_str().unwrap()]);
    let back = wait_for("the job back after the kill", || {
        let s = env.status("batch");
        (s["restarts"] == 1 && s["state"] == "running").then_some(s)
    });
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    let restored = back["restored_checkpoint"].as_str().unwrap().to_string();
    let after = kept_beside(&out, "after");
    assert_eq!(after.len(), 1, "the tail written after the checkpoint is kept: {after:?}");
    assert!(after[0].to_str().unwrap().ends_with(&format!("stasis-after-{restored}")), "{after:?}");
    let tail = numbers(&after[0]);
    assert!(!tail.is_empty() && consecutive_from(&tail, tail[0]), "{tail:?}");
    // The restored job continues from its count at the checkpoint, in a file cut back to it.
    wait_for("the job to write past where it died", || (numbers(&out).last() > tail.last()).then_some(()));
    let lines = numbers(&out);
    assert!(consecutive_from(&lines, 1), "lines 1..N, none lost or doubled: {:?}", &lines[..lines.len().min(50)]);
    assert!(env.log("batch").contains("stasis-after-"), "the log says so");
    env.ok(&["stop", "batch"]);
}

#[test]
fn a_line_appended_by_hand_while_stopped_is_kept_beside_and_the_file_cut_back() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let out = job(&env, "notes-job", kill, None, "");
    env.start("notes-job");
    wait_for("some lines", || (numbers(&out).len() > 20).then_some(()));
    env.ok(&["stop", "notes-job"]);
    let at_stop = std::fs::read(&out).unwrap();
    let cp = env.checkpoint_dirs("notes-job").pop().unwrap();
    assert_eq!(manifest(&cp)["written_files"][0]["size"], at_stop.len() as u64);
    let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
    std::io::Write::write_all(&mut f, b"a note by hand\n").unwrap();
    drop(f);
    let started = env.start("notes-job");
    assert_eq!(started["started_from"], "checkpoint", "{started}");
    assert!(started["warnings"].to_string().contains("stasis-after-"), "start says so: {started}");
    let after = kept_beside(&out, "after");
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(std::fs::read_to_string(&after[0]).unwrap(), "a note by hand\n");
    let owner = |p: &Path| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(p).unwrap());
    assert_eq!(owner(&after[0]), owner(&out), "kept with the file's owner");
    let last = *numbers(&out).last().unwrap();
    wait_for("the job to go on", || (numbers(&out).last() > Some(&(last + 5))).then_some(()));
    let now = std::fs::read(&out).unwrap();
    assert_eq!(&now[..at_stop.len()], &at_stop[..], "back to its bytes at the checkpoint, then continued");
    assert!(consecutive_from(&numbers(&out), 1));
    env.ok(&["stop", "notes-job"]);
}

#[test]
fn a_file_changed_where_no_copy_was_kept_is_refused_and_on_file_changed_refuse_refuses_an_append() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    // A first line over the copy cap (1 MiB): only the size and hash are kept.
    let out = job(&env, "big", kill, Some(1_200_000), "");
    env.start("big");
    wait_for("some lines", || (numbers(&out).len() > 10).then_some(()));
    env.ok(&["stop", "big"]);
    let cp = env.checkpoint_dirs("big").pop().unwrap();
    assert!(manifest(&cp)["written_files"][0].get("copy").is_none(), "no copy of a file over the cap");
    let original = std::fs::read(&out).unwrap();
    let mut changed = original.clone();
    changed[10] = b'!';
    std::fs::write(&out, &changed).unwrap();
    let refused = env.run(&["start", "big"]);
    let err = String::from_utf8_lossy(&refused.stderr).to_string();
    assert_eq!(refused.status.code(), Some(10), "restore refused: {err}");
    assert!(err.contains(out.to_str().unwrap()) && err.contains("changed"), "{err}");
    assert!(cp.is_dir(), "the checkpoint is kept where it was");
    assert!(!env.service_dir("big").join("quarantine").exists(), "nothing quarantined");
    assert_eq!(std::fs::read(&out).unwrap(), changed, "nothing written to the file");
    // Put back as it was: restored.
    std::fs::write(&out, &original).unwrap();
    assert_eq!(env.start("big")["started_from"], "checkpoint");
    env.ok(&["stop", "big"]);

    // `on_file_changed: refuse`: even an append refuses, and the checkpoint stays.
    let yaml = std::fs::read_to_string(env.path().join("conf/big.yaml")).unwrap();
    env.write_service("big", &format!("{yaml}on_file_changed: refuse\n"));
    let cp = env.checkpoint_dirs("big").pop().unwrap();
    let at_stop = std::fs::read(&out).unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
    std::io::Write::write_all(&mut f, b"appended\n").unwrap();
    drop(f);
    let refused = env.run(&["start", "big"]);
    let err = String::from_utf8_lossy(&refused.stderr).to_string();
    assert_eq!(refused.status.code(), Some(10), "{err}");
    assert!(err.contains("on_file_changed: refuse") && err.contains(out.to_str().unwrap()), "{err}");
    assert!(cp.is_dir() && kept_beside(&out, "after").is_empty());
    std::fs::write(&out, &at_stop).unwrap();
    assert_eq!(env.start("big")["started_from"], "checkpoint");
    env.ok(&["stop", "big"]);
}

#[test]
fn a_restore_failing_because_of_the_host_keeps_the_checkpoint_for_the_next_start() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let input = env.path().join("input.txt");
    std::fs::write(&input, "the input\n").unwrap();
    env.write_service(
        "reader",
        &format!(
            "command: [\"/usr/bin/python3\", \"{REPO}/tests/programs/numbered_lines.py\", \"hold\", \"{}\"]\nuser: stasis-example\nkill_port: {kill}\n",
            input.display()
        ),
    );
    env.start("reader");
    env.ok(&["stop", "reader"]);
    let cp = env.checkpoint_dirs("reader").pop().unwrap();
    // A file the service reads changed size: CRIU refuses it, and that is the host's doing.
    std::fs::write(&input, "the input, edited\n").unwrap();
    let failed = env.run(&["start", "reader"]);
    let err = String::from_utf8_lossy(&failed.stderr).to_string();
    assert_eq!(failed.status.code(), Some(6), "{err}");
    assert!(err.contains("changed size") && err.contains("not quarantined") && err.contains("input.txt"), "{err}");
    assert!(cp.is_dir(), "the checkpoint is kept where it was");
    assert!(!env.service_dir("reader").join("quarantine").exists(), "nothing quarantined");
    std::fs::write(&input, "the input\n").unwrap();
    let started = env.start("reader");
    assert_eq!(started["started_from"], "checkpoint", "after the fix: {started}");
    env.ok(&["stop", "reader"]);
}

#[test]
fn a_cold_start_failing_after_a_quarantine_says_both() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let input = env.path().join("input.txt");
    std::fs::write(&input, "the input\n").unwrap();
    env.write_service(
        "both",
        &format!(
            "command: [\"/usr/bin/python3\", \"{REPO}/tests/programs/numbered_lines.py\", \"hold\", \"{}\"]\nuser: stasis-example\nkill_port: {kill}\n",
            input.display()
        ),
    );
    env.start("both");
    env.ok(&["stop", "both"]);
    let cp = env.checkpoint_dirs("both").pop().unwrap();
    let pages = std::fs::read_dir(cp.join("images"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("pages-"))
        .unwrap();
    let mut bytes = std::fs::read(&pages).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&pages, bytes).unwrap();
    // The cold launch fails too: the program cannot open its input.
    std::fs::remove_file(&input).unwrap();
    let failed = env.run(&["start", "both"]);
    let err = String::from_utf8_lossy(&failed.stderr).to_string();
    assert_eq!(failed.status.code(), Some(6), "{err}");
    assert!(err.contains("within its first second"), "the cold launch's error: {err}");
    assert!(err.contains("quarantined it") && err.contains(cp.file_name().unwrap().to_str().unwrap()), "{err}");
}
