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
use std::time::Duration;

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

/// The service's check of its memory; if it never answers, what its logs say.
fn check_or_say(env: &Env, name: &str, port: u16) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(a) = http(port, "GET", "/check", "") {
            return a;
        }
        if std::time::Instant::now() > deadline {
            let tail = |f: &str| {
                let t = std::fs::read_to_string(env.service_dir(name).join(f)).unwrap_or_default();
                t.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            };
            panic!(
                "the service never answered /check: {}\nservice.log ends:\n{}\nsupervisor.log ends:\n{}",
                env.status(name),
                tail("service.log"),
                tail("supervisor.log")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
    // Removed by the supervisor once it has seen the daemon's exit: moments after it.
    wait_for("the plain images to be gone", || (!dir.join(".restore-lazy").exists()).then_some(()));
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

/// Waits until no lazy-pages daemon of the restore of `dir` is left; says what is left (state,
/// parent, where it waits, the daemon's log) if one is.
fn daemons_end(dir: &Path) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = daemons(dir);
        if left.is_empty() {
            return;
        }
        if std::time::Instant::now() > deadline {
            let about: Vec<String> = left
                .iter()
                .map(|pid| {
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    let pick = |k: &str| status.lines().find(|l| l.starts_with(k)).unwrap_or_default().to_string();
                    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
                    let stack = std::fs::read_to_string(format!("/proc/{pid}/stack")).unwrap_or_default();
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    format!(
                        "pid {pid}: {} {} wchan {wchan}\n{}\n{stack}",
                        pick("State:"),
                        pick("PPid:"),
                        String::from_utf8_lossy(&cmdline).replace('\0', " ")
                    )
                })
                .collect();
            let log = std::fs::read_to_string(dir.join("lazy-pages.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "a lazy-pages daemon did not end within {WAIT:?}: {about:#?}\nlazy-pages.log ends:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the daemon of the restore of `dir` is gone, having transferred every page.
fn complete(dir: &Path) {
    daemons_end(dir);
    let log = std::fs::read_to_string(dir.join("lazy-pages.log")).unwrap_or_default();
    let done: Vec<&str> = log.lines().filter(|l| l.contains("UFFD transferred pages")).collect();
    assert!(!done.is_empty(), "the daemon summed up its transfer:\n{log}");
    for l in done {
        let (sent, total) = l.rsplit_once('(').unwrap().1.trim_end_matches(')').split_once('/').unwrap();
        assert_eq!(sent, total, "every page of each process was transferred: {l}");
    }
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

#[test]
fn compressed_and_encrypted_checkpoints_restore_lazily_with_every_byte_right() {
    let env = Env::new();
    let [k1, p1, k2, p2] = free_ports::<4>();
    let key = key_file(&env, "lazy");
    env.write_service("squeezed", &yaml(&env, k1, p1, 48, "compression: zstd\n"));
    let sealed = format!("compression: zstd\nencryption_key_file: {}\n", key.display());
    env.write_service("vault", &yaml(&env, k2, p2, 48, &sealed));
    for (name, port) in [("squeezed", p1), ("vault", p2)] {
        env.start(name);
        let before = token(port);
        let (_, dir) = stop(&env, name);
        let started = env.start(name);
        assert_eq!(started["started_from"], "checkpoint", "{name}: {started}");
        assert_eq!(token(port), before, "{name}: the same service");
        assert_eq!(check(port), format!("ok {}", 48 << 8), "{name}: every page right");
        complete(&dir);
        assert_lazy(&dir);
        env.ok(&["stop", name]);
    }
}

#[test]
fn a_flipped_byte_in_the_pages_kills_the_tree_before_it_runs_on_a_bad_page() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("flip", &yaml(&env, kill, port, 64, ""));
    env.start("flip");
    let old = token(port);
    let (id, dir) = stop(&env, "flip");
    let (file, len) = std::fs::read_dir(dir.join("images"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
        .filter(|(n, _)| n.starts_with("pages-"))
        .max_by_key(|(_, l)| *l)
        .expect("a pages image");
    // Inside the service's big lazy memory: found only when the daemon asks for it.
    let at = len / 2 + 1;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("images").join(&file)).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    }
    env.start("flip");
    // Whatever the restored tree answers, it is never a check over a bad page: a fault on the
    // unserved page waits until the tree is killed.
    let answered = http(port, "GET", "/check", "");
    assert!(answered.as_deref().is_none_or(|a| !a.starts_with("bad") && a != old), "{answered:?}");
    let status = wait_for("the cold start after the failed lazy restore", || {
        let s = env.status("flip");
        (s["started_from"] == "cold").then_some(s)
    });
    let reason = status["fallback_reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains(&id) && reason.contains(&format!("images/{file}")),
        "names the checkpoint and the file: {reason}"
    );
    assert!(reason.contains("quarantined"), "a damaged checkpoint is quarantined: {reason}");
    assert_ne!(token(port), old, "a cold start");
    assert_eq!(check(port), format!("ok {}", 64 << 8));
    assert!(daemons(&dir).is_empty());
    env.ok(&["stop", "flip", "--no-checkpoint"]);
    release_criu_tables(&env.service_dir("flip"));
}

/// A service `name` of `mib` MiB that reads pages all over its memory all the time, and the
/// socket where it reports a page it read that is not its pattern, the moment it reads it.
fn touching_service(env: &Env, name: &str, kill: u16, port: u16, mib: u32) -> std::net::UdpSocket {
    let reports = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    reports.set_nonblocking(true).unwrap();
    let beacon = reports.local_addr().unwrap().port();
    let extra = format!("  TOUCH: \"1\"\n  BEACON: \"{beacon}\"\n");
    env.write_service(name, &yaml(env, kill, port, mib, &extra));
    reports
}

/// A number from the clock, for the moment of a kill.
fn jitter(max_ms: u64) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    Duration::from_millis(nanos % max_ms.max(1))
}

/// Kills the first lazy-pages daemon of the restore of `dir` whose parent is a supervisor of
/// this test's state directory, `after` once it appears (or gives up after a while). The
/// supervisor is stopped (SIGSTOP) around the kill for `hold`, so that for that long nothing
/// ends the restored tree: what the tree reads meanwhile is what the held userfaultfds give it
/// (a fault that waits), never zeros; a tree that read zeros where its heap should be crashes
/// (seen without the held references), so the tree must still be alive at the end. Returns
/// whether SIGKILL was sent, and whether the restored tree (the supervisor's namespace init) was
/// alive when the supervisor was let go.
fn kill_daemon_after(
    dir: PathBuf,
    state_dir: String,
    after: Duration,
    hold: Duration,
) -> std::thread::JoinHandle<(bool, bool)> {
    use nix::sys::signal::Signal;
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let marker = dir.display().to_string();
        while std::time::Instant::now() < deadline {
            for pid in daemons(&dir) {
                let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<i32>().ok());
                let Some(ppid) = ppid else { continue };
                let parent = std::fs::read(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
                let parent = String::from_utf8_lossy(&parent).replace('\0', " ");
                // Ours: criu lazy-pages in this checkpoint's directory, a child of our supervisor.
                if !(parent.contains("__supervise") && parent.contains(&state_dir)) {
                    continue;
                }
                std::thread::sleep(after);
                let stopped = signal_if_ours(ppid, &["__supervise", &state_dir], Signal::SIGSTOP);
                let sent = signal_if_ours(pid, &["lazy-pages", &marker], Signal::SIGKILL);
                std::thread::sleep(hold);
                let alive = tree_alive(ppid);
                if stopped {
                    verified_signal(ppid, &["__supervise", &state_dir], Signal::SIGCONT);
                }
                return (sent, alive);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (false, false)
    })
}

/// Whether a namespace init child of `supervisor` is alive (not a zombie).
fn tree_alive(supervisor: i32) -> bool {
    let children =
        std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children")).unwrap_or_default();
    children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()).any(|pid| {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        comm.starts_with("stasis-init") && !is_gone(pid)
    })
}

#[test]
fn the_daemon_killed_at_random_moments_under_load_never_leaves_zeros() {
    const MIB: u32 = 512;
    const ROUNDS: usize = 6;
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let reports = touching_service(&env, "victim", kill, port, MIB);
    env.start("victim");
    let state_dir = env.state_dir().display().to_string();
    let mut outcomes = Vec::new();
    for round in 0..ROUNDS {
        let before = token(port);
        let (_, dir) = stop(&env, "victim");
        let after = jitter(2500);
        let killer = kill_daemon_after(dir.clone(), state_dir.clone(), after, Duration::from_millis(700));
        let started = env.start("victim");
        let (sent, alive) = killer.join().unwrap();
        // Either every page came in (and the memory is right), or the tree was killed (or never
        // resumed) and the service started another way: never a service that runs on a page
        // that was not served. Once the daemon is gone the supervisor has decided within moments.
        daemons_end(&dir);
        std::thread::sleep(Duration::from_millis(1500));
        let s = env.status("victim");
        let answer = check_or_say(&env, "victim", port);
        let now = token(port);
        let outcome = match (started["started_from"].as_str(), s["started_from"].as_str(), now == before) {
            (Some("checkpoint"), Some("checkpoint"), true) => "completed",
            (Some("checkpoint"), Some("cold"), false) => "killed after it resumed, cold-started",
            (_, _, false) => "failed during the restore, fell back",
            other => panic!("round {round}: unexpected {other:?}: {started} {s}"),
        };
        eprintln!("round {round}: kill after {after:?} sent: {sent}: {outcome}: {answer}");
        eprintln!("  {} / {}", started["fallback_reason"], s["fallback_reason"]);
        assert!(answer.starts_with("ok "), "round {round} ({outcome}, kill sent: {sent}): {answer}");
        let mut buf = [0u8; 64];
        if let Ok(n) = reports.recv(&mut buf) {
            panic!("round {round} ({outcome}): the service read a wrong page: {}", String::from_utf8_lossy(&buf[..n]));
        }
        if outcome == "killed after it resumed, cold-started" {
            assert!(alive, "round {round}: the restored tree lived on through the daemon's death (its faults waited)");
        }
        if outcome != "completed" {
            let why = format!("{} {}", started["fallback_reason"], s["fallback_reason"]);
            assert!(why.contains("lazy"), "round {round}: says why: {why}");
        }
        outcomes.push(outcome);
    }
    eprintln!("{outcomes:?}");
    env.ok(&["stop", "victim"]);
    release_criu_tables(&env.service_dir("victim"));
}

#[test]
fn a_daemon_that_hangs_is_given_restore_timeout_then_the_tree_is_killed_and_cold_started() {
    use nix::sys::signal::Signal;
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("hung", &yaml(&env, kill, port, 256, "restore_timeout: 3s\n"));
    env.start("hung");
    let old = token(port);
    let (_, dir) = stop(&env, "hung");
    let state_dir = env.state_dir().display().to_string();
    let marker = dir.display().to_string();
    // Stopped as soon as it runs: it holds the userfaultfds and answers nothing.
    let stopper = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            for pid in daemons(&PathBuf::from(&marker)) {
                let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<i32>().ok());
                let parent = std::fs::read(format!("/proc/{}/cmdline", ppid.unwrap_or(0))).unwrap_or_default();
                let parent = String::from_utf8_lossy(&parent).replace('\0', " ");
                if parent.contains("__supervise") && parent.contains(&state_dir) {
                    // Once the restore has handed it every userfaultfd (it asks for pages then).
                    std::thread::sleep(Duration::from_millis(300));
                    return signal_if_ours(pid, &["lazy-pages", &marker], Signal::SIGSTOP);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    });
    let started = env.start("hung");
    assert!(stopper.join().unwrap(), "the daemon was stopped");
    let status = wait_for("the cold start after the hung daemon", || {
        let s = env.status("hung");
        (s["started_from"] == "cold").then_some(s)
    });
    let why = format!("{} {}", started["fallback_reason"], status["fallback_reason"]);
    // Stopped after the tree resumed: silent past restore_timeout; before: the restore fails.
    let said = why.contains("within 3s") || why.contains("failed: lazy restore: ");
    assert!(why.contains("lazy") && said, "says the daemon was silent: {why}");
    assert_ne!(token(port), old, "a cold start");
    assert_eq!(check(port), format!("ok {}", 256 << 8));
    wait_for("the stopped daemon to be killed", || daemons(&dir).is_empty().then_some(()));
    env.ok(&["stop", "hung", "--no-checkpoint"]);
}

#[test]
fn a_checkpoint_taken_while_pages_still_come_in_holds_every_page_and_status_shows_the_transfer() {
    const MIB: u32 = 512;
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let ready = format!("ready: {{tcp: \"127.0.0.1:{port}\"}}\n");
    env.write_service("midway", &yaml(&env, kill, port, MIB, &ready));
    env.start("midway");
    let before = token(port);
    let (first, dir) = stop(&env, "midway");
    let started = env.start("midway");
    assert_eq!(started["checkpoint"], first.as_str(), "{started}");
    // Right after the start: pages are still coming in, and the status says so.
    let s = env.status("midway");
    let t = &s["lazy_restore"];
    assert_eq!(t["state"], "transferring", "{s}");
    assert_eq!(t["checkpoint"], first.as_str(), "{s}");
    let total = t["pages_total"].as_u64().unwrap();
    assert!(total >= u64::from(MIB) * 256 * 9 / 10, "about {MIB} MiB held lazily: {s}");
    assert_eq!(t["pages_in"].as_u64().unwrap() + t["pages_left"].as_u64().unwrap(), total, "{s}");
    assert!(s["first_answer_ms"].as_u64().is_some(), "with ready:, the first answer is timed: {s}");
    assert!(!daemons(&dir).is_empty(), "the transfer was under way when the stop came");
    // A dump now would miss every page not yet in (they are not in the process): the stop waits
    // for the transfer, and the checkpoint holds every page.
    let (second, dir2) = stop(&env, "midway");
    assert_ne!(second, first);
    assert!(daemons(&dir).is_empty(), "the transfer had ended before the dump");
    let log = std::fs::read_to_string(env.service_dir("midway").join("service.log")).unwrap_or_default();
    let said = format!("Waiting: the lazy restore of checkpoint {first} is bringing pages in");
    assert!(log.contains(&said), "the dump waited for the transfer, and said so:\n{log}");
    let again = env.start("midway");
    assert_eq!(again["checkpoint"], second.as_str(), "{again}");
    assert_eq!(token(port), before, "the same service");
    assert_eq!(check(port), format!("ok {}", MIB << 8), "every page of the second checkpoint right");
    complete(&dir2);
    let s = wait_for("the status to say the transfer is complete", || {
        let s = env.status("midway");
        (s["lazy_restore"]["state"] == "complete").then_some(s)
    });
    let t = &s["lazy_restore"];
    assert_eq!(t["pages_left"], 0, "{s}");
    assert!(t["complete_ms"].as_u64().is_some_and(|ms| ms > 0), "{s}");
    let metrics = env.ok(&["metrics"]);
    assert!(metrics.contains("stasis_lazy_restore_pages_left{service=\"midway\"} 0"), "{metrics}");
    assert!(metrics.contains("stasis_lazy_restore_complete_seconds{service=\"midway\"}"), "{metrics}");
    assert!(metrics.contains("stasis_restore_first_answer_seconds{service=\"midway\"}"), "{metrics}");
    let human = env.ok(&["status", "midway"]);
    assert!(human.contains("lazy restore: every page in"), "{human}");
    env.ok(&["stop", "midway"]);
    release_criu_tables(&env.service_dir("midway"));
}

#[test]
fn the_supervisor_killed_mid_transfer_takes_the_tree_with_it_never_leaving_it_on_zeros() {
    use nix::sys::signal::Signal;
    const MIB: u32 = 768;
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let reports = touching_service(&env, "orphan", kill, port, MIB);
    env.start("orphan");
    let before = token(port);
    let (id, dir) = stop(&env, "orphan");
    env.start("orphan");
    let s = env.status("orphan");
    let state_dir = env.state_dir().display().to_string();
    let supervisor = s["supervisor_pid"].as_i64().expect("a supervisor") as i32;
    let init = s["init_pid"].as_i64().expect("an init pid") as i32;
    assert_eq!(s["lazy_restore"]["state"], "transferring", "{s}");
    assert!(!daemons(&dir).is_empty(), "the transfer is under way");
    let init_pidfd = pidfd_of(init, &["stasis-init"]);
    assert!(signal_if_ours(supervisor, &["__supervise", &state_dir], Signal::SIGKILL), "the supervisor was killed");
    // The guard ends the tree (every process of its PID namespace) while its faults still wait.
    wait_for("the restored tree to be killed", || pidfd_exited(&init_pidfd).then_some(()));
    daemons_end(&dir);
    assert!(http(port, "GET", "/", "").is_none(), "nothing answers on the service's port");
    let mut buf = [0u8; 64];
    if let Ok(n) = reports.recv(&mut buf) {
        panic!("the service read a wrong page: {}", String::from_utf8_lossy(&buf[..n]));
    }
    // The tree ran from the checkpoint for a moment, so it is stale now: the next start says so
    // and cold-starts (as after any run), and the checkpoint is kept, whole: restored on request
    // with every byte right.
    let cold = env.start("orphan");
    assert_eq!(cold["started_from"], "cold", "{cold}");
    let why = cold["fallback_reason"].as_str().unwrap_or_default();
    assert!(why.contains(&id) && why.contains("stale"), "{cold}");
    env.ok(&["stop", "orphan", "--no-checkpoint"]);
    let started: Value = serde_json::from_str(&env.ok(&["start", "orphan", "--from", &id, "--json"])).unwrap();
    assert_eq!(started["checkpoint"], id.as_str(), "{started}");
    assert_eq!(token(port), before, "the same service");
    assert_eq!(check(port), format!("ok {}", MIB << 8));
    env.ok(&["stop", "orphan", "--no-checkpoint"]);
    release_criu_tables(&env.service_dir("orphan"));
}

/// A pidfd of `pid`, once its command line (or name) shows one of `markers`: the pid cannot be
/// reused under it.
fn pidfd_of(pid: i32, markers: &[&str]) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open with no memory arguments; the descriptor is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    assert!(fd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nothing else owns.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let text = format!("{} {comm}", String::from_utf8_lossy(&cmdline));
    assert!(markers.iter().any(|m| text.contains(m)), "pid {pid} is not ours: {text}");
    owned
}

/// Whether the process of `pidfd` has exited.
fn pidfd_exited(pidfd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd we own.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}
