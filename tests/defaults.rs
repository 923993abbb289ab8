//! Kernel objects and daemon patterns that survive stop and start with the plain service file
//! (no `criu:` section: the defaults in criu-configs/default.conf): POSIX and SysV shared
//! memory shared by two processes of the tree, file locks, eventfd/memfd/timerfd/signalfd/
//! inotify, and a datagram socket connected to a syslog-like server outside the service.
//! The service programs are in tests/programs/. Every port is picked free at run time.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A service running tests/programs/PROGRAM as stasis-example, with these environment variables.
fn program_yaml(program: &str, kill_port: u16, env: &[(&str, String)]) -> String {
    let mut y = format!(
        "command: [\"/usr/bin/python3\", \"{REPO}/tests/programs/{program}\"]\nuser: stasis-example\nkill_port: {kill_port}\nenvironment:\n"
    );
    for (k, v) in env {
        y.push_str(&format!("  {k}: \"{v}\"\n"));
    }
    y
}

/// A directory for the service's files, owned by the service user.
fn owned_dir(env: &Env, name: &str) -> PathBuf {
    let dir = env.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(uid_of_user("stasis-example"))), None).unwrap();
    dir
}

fn get(port: u16) -> Value {
    http_json(port).unwrap_or_else(|| panic!("the service on port {port} answers GET /"))
}

fn post(port: u16, path: &str, body: &str) -> Value {
    let out =
        http(port, "POST", path, body).unwrap_or_else(|| panic!("the service on port {port} answers POST {path}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("POST {path}: {e}: {out}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is a number in {v}"))
}

/// Stops the service and starts it again; asserts the start restored the checkpoint.
fn stop_and_start(env: &Env, name: &str) {
    let t = Instant::now();
    env.ok(&["stop", name]);
    let stopped = t.elapsed();
    let t = Instant::now();
    let back = env.start(name);
    eprintln!("{name}: stop took {stopped:?}, start {:?}", t.elapsed());
    assert_eq!(back["started_from"], "checkpoint", "{back}");
}

/// Removes a /dev/shm segment whatever happens to the test.
struct ShmSegment(PathBuf);

impl Drop for ShmSegment {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn shm_counter(path: &Path) -> u64 {
    let bytes = std::fs::read(path).expect("the segment exists in /dev/shm");
    u64::from_ne_bytes(bytes[0..8].try_into().unwrap())
}

#[test]
fn a_posix_shm_segment_shared_by_two_processes_survives_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let name = format!("stasis-test-{}-posix-shm", std::process::id());
    let seg = ShmSegment(Path::new("/dev/shm").join(&name));
    env.write_service("shm", &program_yaml("posix_shm.py", kill, &[("PORT", port.to_string()), ("SHM_NAME", name)]));
    env.start("shm");
    wait_for("the child counting in the segment", || http_json(port).filter(|v| v["counter"].as_u64() > Some(2)));
    post(port, "/text", "changed before the stop");
    let content = std::fs::read(&seg.0).unwrap();
    assert!(String::from_utf8_lossy(&content).contains("changed before the stop"), "the text is in /dev/shm");

    env.ok(&["stop", "shm"]);
    let frozen = shm_counter(&seg.0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(shm_counter(&seg.0), frozen, "nobody writes the segment while the service is stopped");
    let back = env.start("shm");
    assert_eq!(back["started_from"], "checkpoint", "{back}");

    let v = get(port);
    assert_eq!(v["text"], "changed before the stop", "{v}");
    assert!(n(&v, "counter") >= frozen, "the counter continues from {frozen}: {v}");
    assert_eq!(v["child_alive"], true, "{v}");
    // Both processes still share the segment: the child's counting reaches the parent.
    wait_for("the child to keep counting", || http_json(port).filter(|v| v["counter"].as_u64() > Some(frozen + 5)));
    // And the parent's mapping is still the file in /dev/shm.
    post(port, "/text", "changed after the start");
    let content = std::fs::read(&seg.0).unwrap();
    assert!(String::from_utf8_lossy(&content).contains("changed after the start"));
    env.ok(&["stop", "shm"]);
}

/// The segment lives outside everything CRIU writes: stasis keeps a copy with the checkpoint.
/// After a reboot (which empties /dev/shm) it is put back; restoring a checkpoint the service
/// ran on after rewinds it, so the segment matches the memory restored with it.
#[test]
fn a_posix_shm_segment_is_put_back_after_a_reboot_and_rewound_with_an_older_checkpoint() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let name = format!("stasis-test-{}-posix-shm-kept", std::process::id());
    let seg = ShmSegment(Path::new("/dev/shm").join(&name));
    // Three: the on-demand checkpoint must outlive the two stops' under retention.
    let yaml = program_yaml("posix_shm.py", kill, &[("PORT", port.to_string()), ("SHM_NAME", name)]);
    env.write_service("shmk", &format!("{yaml}keep_checkpoints: 3\n"));
    env.start("shmk");
    wait_for("the child counting in the segment", || http_json(port).filter(|v| v["counter"].as_u64() > Some(2)));
    post(port, "/text", "at the checkpoint");
    env.ok(&["checkpoint", "shmk"]);
    let list: serde_json::Value = serde_json::from_str(&env.ok(&["checkpoints", "shmk", "--json"])).unwrap();
    let kept = list["checkpoints"].as_array().unwrap().last().unwrap()["id"].as_str().unwrap().to_string();
    post(port, "/text", "after the checkpoint");

    // A reboot: the stop's checkpoint, /dev/shm emptied, the segment put back from the copy.
    env.ok(&["stop", "shmk"]);
    std::fs::remove_file(&seg.0).unwrap();
    let back = env.start("shmk");
    assert_eq!(back["started_from"], "checkpoint", "restored although /dev/shm was emptied: {back}");
    assert_eq!(get(port)["text"], "after the checkpoint", "the segment as it was at the stop");
    wait_for("the child counting in the put-back segment", || {
        let c = shm_counter(&seg.0);
        std::thread::sleep(Duration::from_millis(200));
        (shm_counter(&seg.0) > c).then_some(())
    });

    // The older checkpoint, taken while the service ran on: the segment goes back with it.
    env.ok(&["stop", "shmk"]);
    assert!(String::from_utf8_lossy(&std::fs::read(&seg.0).unwrap()).contains("after the checkpoint"));
    let back: Value = serde_json::from_str(&env.ok(&["start", "shmk", "--from", &kept, "--json"])).unwrap();
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    assert_eq!(get(port)["text"], "at the checkpoint", "the segment rewound to the checkpoint's moment");
    env.ok(&["stop", "shmk"]);
}

#[test]
fn sysv_shared_memory_and_a_semaphore_shared_by_two_processes_survive_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("sysv", &program_yaml("sysv_ipc.py", kill, &[("PORT", port.to_string())]));
    env.start("sysv");
    wait_for("the child counting in the segment", || http_json(port).filter(|v| v["counter"].as_u64() > Some(2)));
    post(port, "/text", "changed before the stop");
    let before = get(port);
    assert_eq!(before["text"], "changed before the stop");

    stop_and_start(&env, "sysv");
    let v = get(port);
    assert_eq!(v["text"], "changed before the stop", "the segment's content came back: {v}");
    assert!(n(&v, "counter") >= n(&before, "counter"), "the counter continues: {before} then {v}");
    assert_eq!((&v["shmid"], &v["semid"]), (&before["shmid"], &before["semid"]), "the same ids");
    let now = n(&v, "counter");
    // The child still increments under the semaphore: the semaphore was not left taken.
    wait_for("the child to keep counting", || http_json(port).filter(|v| v["counter"].as_u64() > Some(now + 5)));
    post(port, "/text", "changed after the start");
    assert_eq!(get(port)["text"], "changed after the start");
    env.ok(&["stop", "sysv"]);
}

/// Whether another process can take the lock now (non-blocking): flock, a POSIX record lock
/// or an open file description lock.
fn lock_is_free(path: &Path, kind: &str) -> bool {
    let take = match kind {
        "flock" => "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "posix" => "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "ofd" => "fcntl.fcntl(f, 37, struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 0, 0, 0))",
        _ => unreachable!(),
    };
    let script = format!(
        "import fcntl, struct, sys\nf = open(sys.argv[1], 'r+')\ntry:\n    {take}\nexcept (BlockingIOError, PermissionError):\n    sys.exit(3)\n"
    );
    let st = Command::new("/usr/bin/python3").arg("-c").arg(script).arg(path).status().unwrap();
    match st.code() {
        Some(0) => true,
        Some(3) => false,
        other => panic!("the lock probe failed on {}: {other:?}", path.display()),
    }
}

#[test]
fn flock_posix_and_ofd_locks_are_still_held_after_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let dir = owned_dir(&env, "locks");
    env.write_service(
        "locks",
        &program_yaml("file_locks.py", kill, &[("PORT", port.to_string()), ("LOCK_DIR", dir.display().to_string())]),
    );
    env.start("locks");
    wait_for("the service", || http_json(port));
    let kinds = [("flock", "flock.lock"), ("posix", "posix.lock"), ("ofd", "ofd.lock")];
    for (kind, file) in kinds {
        assert!(!lock_is_free(&dir.join(file), kind), "the service holds its {kind} lock");
    }
    let before = n(&get(port), "requests");

    env.ok(&["stop", "locks"]);
    for (kind, file) in kinds {
        assert!(lock_is_free(&dir.join(file), kind), "no {kind} lock while the service is stopped");
    }
    let back = env.start("locks");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    for (kind, file) in kinds {
        assert!(!lock_is_free(&dir.join(file), kind), "the restored service holds its {kind} lock again");
    }
    assert_eq!(n(&get(port), "requests"), before + 1, "the in-memory count continues");
    env.ok(&["stop", "locks"]);
}

/// tests/programs/fd_kinds.py watching `watched`.
fn fd_kinds_yaml(kill_port: u16, port: u16, watched: &Path) -> String {
    program_yaml("fd_kinds.py", kill_port, &[("PORT", port.to_string()), ("WATCH_DIR", watched.display().to_string())])
}

fn watched_dir(env: &Env) -> PathBuf {
    owned_dir(env, "watched")
}

#[test]
fn eventfd_memfd_signalfd_and_inotify_keep_working_after_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let watched = watched_dir(&env);
    env.write_service("fds", &fd_kinds_yaml(kill, port, &watched));
    env.start("fds");
    wait_for("the service", || http_json(port));
    post(port, "/eventfd", "5");
    post(port, "/memfd", "changed before the stop");
    post(port, "/signal", "");
    post(port, "/queue", "");
    std::fs::write(watched.join("before"), "").unwrap();
    let before = wait_for("the signal and the inotify event", || {
        http_json(port).filter(|v| v["usr1"] == 1 && v["created"] == serde_json::json!(["before"]))
    });
    assert_eq!((&before["eventfd"], &before["memfd"]), (&Value::from(5), &Value::from("changed before the stop")));

    stop_and_start(&env, "fds");
    let v = get(port);
    assert_eq!(v["eventfd"], 5, "the eventfd's count: {v}");
    assert_eq!(v["memfd"], "changed before the stop", "the memfd's content, read through its mapping: {v}");
    assert_eq!(v["usr1"], 1, "{v}");
    assert_eq!(v["created"], serde_json::json!(["before"]), "{v}");

    // Each keeps working.
    post(port, "/signal", "");
    wait_for("the signalfd to count a new signal", || http_json(port).filter(|v| v["usr1"] == 2));
    std::fs::write(watched.join("after"), "").unwrap();
    wait_for("inotify to report a file created after the start", || {
        http_json(port).filter(|v| v["created"] == serde_json::json!(["before", "after"]))
    });
    post(port, "/eventfd", "2");
    assert_eq!(get(port)["eventfd"], 7);
    post(port, "/memfd", "changed after the start");
    assert_eq!(get(port)["memfd"], "changed after the start");
    // The SIGUSR2 sent before the stop stayed pending through the checkpoint.
    assert_eq!(post(port, "/drain", "")["drained"], 1, "the signal queued before the stop");
    env.ok(&["stop", "fds"]);
}

/// A periodic timerfd (50 ms) read by a thread. The freeze outlasts a period, so at the dump the
/// timer has expired and waits for the read that would re-arm it: the kernel shows no remaining
/// time, and an unpatched CRIU 4.2.1 restores it disarmed (checkpoint-restore/criu#3162).
/// scripts/criu-patches/0002 (applied by scripts/setup) re-arms such a timer one interval ahead.
#[test]
fn a_periodic_timerfd_keeps_ticking_after_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let watched = watched_dir(&env);
    env.write_service("timer", &fd_kinds_yaml(kill, port, &watched));
    env.start("timer");
    wait_for("the timerfd ticking", || http_json(port).filter(|v| v["ticks"].as_u64() > Some(5)));
    let before = n(&get(port), "ticks");
    stop_and_start(&env, "timer");
    let ticks = n(&get(port), "ticks");
    assert!(ticks >= before, "the tick count continues from {before}: {ticks}");
    // 20 periods: a timer left disarmed never gets there.
    let deadline = Instant::now() + Duration::from_secs(10);
    while n(&get(port), "ticks") < ticks + 20 {
        assert!(
            Instant::now() < deadline,
            "the timerfd stopped ticking after the restore ({} ticks)",
            n(&get(port), "ticks")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    env.ok(&["stop", "timer"]);
}

/// Every "message N" datagram queued on the (non-blocking) socket now, in arrival order.
fn received(server: &std::os::unix::net::UnixDatagram) -> Vec<u64> {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(len) = server.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..len]);
        let n = text.rsplit_once("message ").and_then(|(_, n)| n.parse().ok());
        out.push(n.unwrap_or_else(|| panic!("a syslog line: {text}")));
    }
    out
}

#[test]
fn a_datagram_socket_connected_to_a_syslog_server_outside_the_service_keeps_sending_after_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    // The "syslog daemon": this test, bound to a socket the service connects to, as to /dev/log.
    let path = env.path().join("log.sock");
    let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    server.set_nonblocking(true).unwrap();
    env.write_service(
        "logger",
        &program_yaml(
            "syslog_client.py",
            kill,
            &[("PORT", port.to_string()), ("LOG_SOCKET", path.display().to_string())],
        ),
    );
    env.start("logger");
    let mut all = Vec::new();
    wait_for("messages before the stop", || {
        all.extend(received(&server));
        (all.len() >= 5).then_some(())
    });
    env.ok(&["stop", "logger"]);
    all.extend(received(&server));
    let last = *all.last().unwrap();
    let back = env.start("logger");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    wait_for("messages after the start", || {
        all.extend(received(&server));
        (*all.last().unwrap() >= last + 10).then_some(())
    });
    let expected: Vec<u64> = (1..=*all.last().unwrap()).collect();
    assert_eq!(all, expected, "every message once, in order, numbering continued from {last}");
    assert_eq!(get(port)["failed"], 0, "no send failed");
    env.ok(&["stop", "logger"]);
    // The server is gone at the restore (syslog not up yet): the host's problem, not the
    // checkpoint's. The start fails saying so, and the checkpoint is kept for the next try.
    drop(server);
    std::fs::remove_file(&path).unwrap();
    let out = env.run(&["start", "logger"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("not listening"), "names the cause: {err}");
    let list: serde_json::Value = serde_json::from_str(&env.ok(&["checkpoints", "logger", "--json"])).unwrap();
    assert!(!list["checkpoints"].as_array().unwrap().is_empty(), "the checkpoint is kept: {list}");
    assert!(!env.service_dir("logger").join("quarantine").exists(), "nothing quarantined");
    let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    server.set_nonblocking(true).unwrap();
    let back = env.start("logger");
    assert_eq!(back["started_from"], "checkpoint", "with the server back, the same checkpoint: {back}");
    wait_for("messages to the new server", || (!received(&server).is_empty()).then_some(()));
    env.ok(&["stop", "logger"]);
}
