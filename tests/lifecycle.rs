//! The core lifecycle on the bundled example service (examples/notes): cold start as the
//! service user, kill-port checkpoint, restore with state and output intact, `checkpoint`
//! that keeps the service running, and the status fields scripts rely on.

mod common;
use common::*;

#[test]
fn notes_state_survives_kill_port_and_restore() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("notes", &notes_yaml(kill, http_port, ""));

    let started = env.start("notes");
    assert_eq!(started["started_from"], "cold");
    let before = wait_for("notes to answer", || http_json(http_port));
    let example_uid = uid_of_user("stasis-example");
    assert_eq!(before["uid"], example_uid, "the service runs as its service user");
    let st = env.status("notes");
    assert_eq!(st["state"], "running");
    assert_eq!(st["started_from"], "cold");
    assert_eq!(st["checkpoint"], serde_json::Value::Null);
    assert_eq!(uid_of(st["pid"].as_i64().unwrap()), example_uid, "status pid is the service's main process");

    for i in 0..20 {
        http(http_port, "POST", "/notes", &format!("note {i}")).expect("post a note");
    }
    let cold_started_at = before["cold_started_at"].clone();
    wait_for("10 heartbeats in the log", || (heartbeats(&env.log("notes")).len() >= 10).then_some(()));

    // The kill port: the first line arrives at once, the last says OK.
    let lines = kill_port(kill);
    assert!(lines[0].starts_with("Saving checkpoint of notes"), "{lines:?}");
    let last = lines.last().unwrap();
    assert!(last.starts_with("OK checkpoint "), "{lines:?}");
    let id = last.split_whitespace().nth(2).unwrap().to_string();
    wait_for("the supervisor to exit", || (env.status("notes")["state"] == "stopped").then_some(()));
    assert!(http_json(http_port).is_none(), "the service is gone after the kill port");
    let st = env.status("notes");
    assert_eq!(st["checkpoint"], id.as_str());
    assert_eq!(st["pid"], serde_json::Value::Null);

    // The checkpoint is a complete, root-only directory with a manifest.
    let dir = env.service_dir("notes").join("checkpoints").join(&id);
    assert!(dir.join("manifest.json").is_file());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.service_dir("notes").join("checkpoints")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "checkpoints are root-only");

    let restarted = env.start("notes");
    assert_eq!(restarted["started_from"], "checkpoint");
    assert_eq!(restarted["checkpoint"], id.as_str());
    let after = wait_for("restored notes to answer", || http_json(http_port));
    assert_eq!(after["notes"].as_array().unwrap().len(), 20, "every note survived");
    assert_eq!(after["notes"][19], "note 19");
    assert_eq!(after["cold_started_at"], cold_started_at, "same process state, not a new cold start");
    assert_eq!(after["uid"], example_uid, "restored service still runs as its service user");
    let st = env.status("notes");
    assert_eq!(st["state"], "running");
    assert_eq!(st["started_from"], "checkpoint");
    assert_eq!(uid_of(st["pid"].as_i64().unwrap()), example_uid);

    // Second cycle through `stasis stop`, then check the output log across both cycles.
    let so_far = heartbeats(&env.log("notes")).len();
    wait_for("10 more heartbeats", || (heartbeats(&env.log("notes")).len() >= so_far + 10).then_some(()));
    let out = env.ok(&["stop", "notes"]);
    assert!(out.lines().next().unwrap().starts_with("Saving checkpoint"), "{out}");
    assert!(out.lines().last().unwrap().starts_with("OK checkpoint"), "{out}");
    let beats = heartbeats(&env.log("notes"));
    assert!(beats.len() >= 20, "heartbeats reached the log: {}", beats.len());
    let expected: Vec<u64> = (1..=beats.len() as u64).collect();
    assert_eq!(beats, expected, "no output line lost or doubled across checkpoints and restores");
    let log = env.log("notes");
    assert!(log.contains("restored from checkpoint"), "the log tells the story");
}

#[test]
fn checkpoint_keeps_the_service_running() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("keep", &notes_yaml(kill, http_port, ""));
    env.start("keep");
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "kept").unwrap();
    let out = env.ok(&["checkpoint", "keep", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    let id = v["checkpoint"].as_str().unwrap().to_string();
    let st = env.status("keep");
    assert_eq!(st["state"], "running");
    assert_eq!(st["checkpoint"], id.as_str());
    assert!(http_json(http_port).is_some(), "still answering after the checkpoint");
    http(http_port, "POST", "/notes", "after").unwrap();

    // `checkpoints` lists it, with the manifest's facts.
    let list: serde_json::Value = serde_json::from_str(&env.ok(&["checkpoints", "keep", "--json"])).unwrap();
    assert_eq!(list["checkpoints"][0]["id"], id.as_str());
    assert_eq!(list["checkpoints"][0]["latest"], true);
    assert_eq!(list["checkpoints"][0]["kind"], "keep-running");
    assert!(list["checkpoints"][0]["size_bytes"].as_u64().unwrap() > 0);

    env.ok(&["stop", "keep"]);
    env.start("keep");
    let after = wait_for("restored", || http_json(http_port));
    assert_eq!(after["notes"], serde_json::json!(["kept", "after"]), "the stop checkpoint is the newer one");
    env.ok(&["stop", "keep"]);
}

#[test]
fn start_and_stop_refuse_politely() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("twice", &notes_yaml(kill, http_port, ""));
    let out = env.ok(&["stop", "twice"]);
    assert!(out.contains("already stopped"), "{out}");
    env.start("twice");
    let second = env.run(&["start", "twice"]);
    assert_eq!(second.status.code(), Some(4), "second start is refused with exit 4");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("twice is already running") && err.contains("stasis stop twice"), "{err}");
    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    assert_eq!(listed[0]["name"], "twice");
    assert_eq!(listed[0]["state"], "running");
    env.ok(&["stop", "twice"]);
    let out = env.ok(&["stop", "twice"]);
    assert!(out.contains("already stopped"), "{out}");
    let err = env.run(&["checkpoint", "twice"]);
    assert_eq!(err.status.code(), Some(8), "checkpoint of a stopped service: exit 8");
}

#[test]
fn a_service_that_exits_by_itself_is_failed() {
    let env = Env::new();
    let [kill_instant, kill_oneshot] = free_ports::<2>();
    // At once: the start itself fails, with the exit status and the last output.
    env.write_service(
        "instant",
        &format!("command: [\"/bin/sh\", \"-c\", \"echo first; echo bye; exit 3\"]\nuser: stasis-example\nkill_port: {kill_instant}\n"),
    );
    let out = env.run(&["start", "instant"]);
    assert_eq!(out.status.code(), Some(6), "a command that dies at once is a failed start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exited with status 3 within its first second") && err.contains("bye"), "{err}");
    assert_eq!(env.status("instant")["state"], "failed");
    // Later: the start worked, then the service failed.
    env.write_service(
        "oneshot",
        &format!("command: [\"/bin/sh\", \"-c\", \"echo bye; sleep 2; exit 3\"]\nuser: stasis-example\nkill_port: {kill_oneshot}\n"),
    );
    env.start("oneshot");
    let st = wait_for("state failed", || {
        let st = env.status("oneshot");
        (st["state"] == "failed").then_some(st)
    });
    assert!(st["message"].as_str().unwrap().contains("status 3"), "{st}");
    assert!(env.log("oneshot").contains("bye"));
}

#[test]
fn two_kill_port_connections_share_one_checkpoint() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("pair", &notes_yaml(kill, http_port, ""));
    env.start("pair");
    wait_for("service", || http_json(http_port));
    let connect = move || {
        use std::io::BufRead;
        std::net::TcpStream::connect(("127.0.0.1", kill))
            .map(|s| std::io::BufReader::new(s).lines().map_while(Result::ok).collect::<Vec<_>>())
            .unwrap_or_else(|_| vec![String::from("refused")])
    };
    let a = std::thread::spawn(connect);
    let b = std::thread::spawn(connect);
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    let (la, lb) = (a.last().unwrap(), b.last().unwrap());
    // Either both joined the same dump, or the second connected after the supervisor was gone.
    assert!(la.starts_with("OK checkpoint ") || lb.starts_with("OK checkpoint "), "{a:?} {b:?}");
    if la.starts_with("OK") && lb.starts_with("OK") {
        assert_eq!(la, lb, "one checkpoint for both");
    }
    assert_eq!(env.checkpoint_dirs("pair").len(), 1);
}

#[test]
fn a_tree_orphaned_by_a_dead_supervisor_is_not_started_twice() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("orphan", &notes_yaml(kill, http_port, ""));
    env.start("orphan");
    wait_for("service", || http_json(http_port));
    let st = env.status("orphan");
    let supervisor = pid_in(&st["supervisor_pid"]).unwrap();
    let init = st["init_pid"].as_i64().unwrap() as i32;
    verified_kill(supervisor, &["__supervise", "orphan", &env.state_dir().display().to_string()]);
    wait_for("status to see the dead supervisor", || (env.status("orphan")["state"] == "failed").then_some(()));
    assert!(http_json(http_port).is_some(), "the orphaned service still runs");

    let out = env.run(&["start", "orphan"]);
    assert_eq!(out.status.code(), Some(4), "refused like any running service");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("still running without a supervisor") && err.contains(&init.to_string()), "{err}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(init), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for("the orphan to be gone", || http_json(http_port).is_none().then_some(()));
    assert_eq!(env.start("orphan")["started_from"], "cold");
    env.ok(&["stop", "orphan"]);
}

/// A caller with stray open file descriptors (a shell script's `exec 9<file`) must not leak them
/// into the service, where they would end up in every checkpoint.
#[test]
fn stray_descriptors_of_the_caller_do_not_reach_the_service() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("stray", &notes_yaml(kill, http_port, ""));
    // Known to the harness, so a failing stop below still leaves no service behind.
    env.adopt("stray");
    let stray = std::fs::File::open("/etc/passwd").unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stray);
    let mut cmd = env.cmd(&["start", "stray"]);
    // SAFETY: dup2 in the child before exec; the new fd 9 has no close-on-exec flag.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if nix::libc::dup2(fd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    assert!(cmd.status().unwrap().success());
    let _cleanup = StopOnDrop(&env, "stray");
    wait_for("service", || http_json(http_port));
    let pid = env.status("stray")["pid"].as_i64().unwrap();
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(!fds.contains(&"9".to_string()), "fd 9 leaked into the service: {fds:?}");
    env.ok(&["stop", "stray"]);
}

struct StopOnDrop<'a>(&'a Env, &'a str);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.cmd(&["stop", self.1]).output();
    }
}

/// Context switches of every thread of `pid` (a thread that sleeps and wakes up counts).
fn context_switches(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|t| {
            std::fs::read_to_string(t.path().join("status"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

#[test]
fn an_idle_supervisor_does_not_wake_up() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    env.write_service(
        "idle",
        &format!("command: [\"/bin/sleep\", \"600\"]\nuser: stasis-example\nkill_port: {kill}\n"),
    );
    env.start("idle");
    let sup = pid_in(&env.status("idle")["supervisor_pid"]).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let before = context_switches(sup);
    std::thread::sleep(std::time::Duration::from_secs(5));
    let after = context_switches(sup);
    let threads = std::fs::read_dir(format!("/proc/{sup}/task"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|t| std::fs::read_to_string(t.path().join("status")).unwrap_or_default())
        .map(|s| {
            s.lines().filter(|l| l.starts_with("Name:") || l.contains("ctxt_switches")).collect::<Vec<_>>().join(" ")
        })
        .collect::<Vec<_>>();
    assert_eq!(after, before, "the idle supervisor woke up {} times in 5 s: {threads:?}", after.saturating_sub(before));
    // ...and still hears its kill port.
    assert!(kill_port(kill).last().unwrap().starts_with("OK checkpoint"));
}

#[test]
fn checkpoints_record_their_timings_and_sizes_and_metrics_show_them() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    let prom = env.path().join("metrics.prom");
    std::fs::write(env.path().join("stasis.yaml"), format!("metrics_file: {}\n", prom.display())).unwrap();
    env.write_service("timed", &notes_yaml(kill, http_port, ""));
    env.start("timed");
    wait_for("service", || http_json(http_port));
    let stopped: serde_json::Value = serde_json::from_str(&env.ok(&["stop", "timed", "--json"])).unwrap();
    let id = stopped["checkpoint"].as_str().unwrap().to_string();
    let list: serde_json::Value = serde_json::from_str(&env.ok(&["checkpoints", "timed", "--json"])).unwrap();
    let t = &list["checkpoints"][0]["timings"];
    for key in ["freeze_ms", "dump_ms", "fsync_ms", "pages", "bytes_written"] {
        assert!(t[key].is_u64(), "{key} in {t}");
    }
    assert!(t["pages"].as_u64() > Some(0) && t["bytes_written"].as_u64() > Some(1 << 20), "{t}");
    assert!(t["freeze_ms"].as_u64() <= t["dump_ms"].as_u64(), "frozen within the dump: {t}");
    env.start("timed");
    let st = env.status("timed");
    assert!(st["restore_ms"].is_u64(), "{st}");
    assert_eq!(st["checkpoint"], id.as_str());
    assert!(st["checkpoint_timings"]["restore_ms"].is_u64(), "{st}");
    let metrics = env.ok(&["metrics"]);
    for sample in [
        "stasis_up{service=\"timed\"} 1",
        "stasis_restores_total{service=\"timed\"} 1",
        "stasis_cold_starts_total{service=\"timed\"} 1",
        "stasis_checkpoints_total{service=\"timed\"} 1",
        "stasis_checkpoint_fresh{service=\"timed\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == sample), "{sample} in:\n{metrics}");
    }
    assert!(metrics.contains("# TYPE stasis_checkpoint_bytes gauge"), "{metrics}");
    let file = std::fs::read_to_string(&prom).expect("the supervisor keeps metrics_file up to date");
    assert!(file.contains("stasis_restores_total{service=\"timed\"} 1"), "{file}");
    env.ok(&["stop", "timed"]);
}

#[test]
fn the_namespace_init_is_the_small_init_program() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    env.write_service(
        "tiny",
        &format!("command: [\"/bin/sleep\", \"600\"]\nuser: stasis-example\nkill_port: {kill}\n"),
    );
    env.start("tiny");
    let init = pid_in(&env.status("tiny")["init_pid"]).unwrap();
    let exe = std::fs::read_link(format!("/proc/{init}/exe")).unwrap();
    assert!(exe.starts_with(env.state_dir().join("bin")), "run from its content-addressed copy: {}", exe.display());
    assert_eq!(std::fs::read(&exe).unwrap(), std::fs::read(INIT_BIN).unwrap(), "a copy of stasis-init");
    let (init_size, cli_size) = (std::fs::metadata(INIT_BIN).unwrap().len(), std::fs::metadata(BIN).unwrap().len());
    assert!(init_size * 4 < cli_size, "much smaller than the CLI: {init_size} vs {cli_size} bytes");
    // The restore maps the same copy.
    env.ok(&["stop", "tiny"]);
    assert_eq!(env.start("tiny")["started_from"], "checkpoint");
    env.ok(&["stop", "tiny"]);
}

#[test]
fn logs_follow_keeps_up_across_rotations_without_gaps() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    env.write_service(
        "chatty",
        &format!("command: [\"/usr/bin/python3\", \"-c\", \"import time\\nfor i in range(1000000): print('line', i, 'x' * 10000, flush=True); time.sleep(0.002)\"]\nuser: stasis-example\nkill_port: {kill}\nlog_max_bytes: 1048576\nlog_keep: 2\n"),
    );
    env.start("chatty");
    let mut child = env.cmd(&["logs", "chatty", "-f"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let seen: Vec<u64> = {
        use std::io::BufRead;
        let mut v = Vec::new();
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("line ").and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok()) {
                v.push(n);
                if n >= 500 {
                    break;
                }
            }
        }
        v
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.last() >= Some(&500), "followed to line 500: {:?}", seen.last());
    assert!(env.service_dir("chatty").join("service.log.1").exists(), "the log rotated meanwhile");
    let gaps: Vec<_> = seen.windows(2).filter(|w| w[1] != w[0] + 1).collect();
    assert!(gaps.is_empty(), "no line lost or doubled across rotations: {gaps:?}");
}

/// A service holding 1 GiB, so that its dump takes more than a second.
/// 2 GiB: CRIU copies memory at 1.2-1.4 GB/s here at best, so its dump takes well over the
/// second after which progress is shown, however fast the disk is that day (1 GiB once took
/// only 0.92 s).
fn big_yaml(kill_port: u16) -> String {
    format!(
        "command: [\"/usr/bin/python3\", \"-c\", \"import os, time\\nb = bytearray(os.urandom(1 << 20)) * 2048\\nprint('ready', flush=True)\\ntime.sleep(100000)\"]\nuser: stasis-example\nkill_port: {kill_port}\n"
    )
}

#[test]
fn a_long_dump_reports_progress_as_plain_lines_in_a_pipe_and_in_place_on_a_terminal() {
    let env = Env::new();
    let [kill_pipe, kill_tty] = free_ports::<2>();
    for (name, port) in [("bigpipe", kill_pipe), ("bigtty", kill_tty)] {
        env.write_service(name, &big_yaml(port));
        env.start(name);
        wait_for("2 GiB touched", || env.log(name).contains("ready").then_some(()));
    }
    // A pipe: plain lines, no carriage returns.
    let out = env.ok(&["stop", "bigpipe"]);
    // Its phase (dumping, or syncing once the images are written) and bytes each second.
    let progress: Vec<&str> = out
        .lines()
        // pre-copying: a stop on a kernel with soft-dirty copies the memory first (pre_copy.rs).
        .filter(|l| {
            ["freezing", "pre-copying", "dumping", "syncing"].iter().any(|p| l.starts_with(&format!("Progress: {p}, ")))
        })
        .collect();
    assert!(!progress.is_empty(), "a dump over a second reports progress: {out}");
    assert!(progress[0].contains("MiB/s") && !out.contains('\r'), "{out}");
    assert!(out.lines().last().unwrap().starts_with("OK checkpoint"), "{out}");
    // A terminal (script gives the command a pty): the progress line is redrawn in place.
    let envs: Vec<(String, String)> = env
        .cmd(&[])
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_string_lossy().into_owned(), v?.to_string_lossy().into_owned())))
        .collect();
    let tty = std::process::Command::new("script")
        .args(["-qec", &format!("{BIN} stop bigtty"), "/dev/null"])
        .envs(envs)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{text}");
    assert!(
        text.contains("Progress: ") && text.contains(" written (") && text.contains('\r'),
        "redrawn in place on a terminal: {text:?}"
    );
    assert!(text.contains("OK checkpoint"), "{text:?}");
    // A big restore: its phase as it begins, then bytes read each second. No verifying phase:
    // the images are checked as CRIU reads them.
    let out = env.ok(&["start", "bigpipe"]);
    assert!(!out.contains("Progress: verifying") && out.contains("Progress: restoring 2.0 GiB"), "{out}");
    assert!(!out.contains('\r') && out.lines().last().unwrap().contains("restored from checkpoint"), "{out}");
    let tty = std::process::Command::new("script")
        .args(["-qec", &format!("{BIN} start bigtty"), "/dev/null"])
        .envs(env.cmd(&[]).get_envs().filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{text}");
    assert!(text.contains("Progress: restoring") && text.contains('\r'), "redrawn in place on a terminal: {text:?}");
    assert!(text.contains("restored from checkpoint"), "{text:?}");
    for name in ["bigpipe", "bigtty"] {
        env.ok(&["stop", name]);
    }
}

/// A checkpoint that leaves the service running has its big memory images hashed from the disk:
/// the hashes must be those of the whole files, or the restore's verification would refuse the
/// checkpoint. 96 MiB of random memory, restored with `--from`.
#[test]
fn a_big_checkpoint_hashed_while_criu_wrote_it_verifies_and_restores_the_same_memory() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service(
        "big",
        &format!(
            "command: [\"/usr/bin/python3\", \"{REPO}/tests/programs/big_memory.py\"]\nuser: stasis-example\nkill_port: {kill}\nkeep_checkpoints: 3\nenvironment:\n  MIB: \"96\"\n  PORT: \"{port}\"\n"
        ),
    );
    env.start("big");
    let before = wait_for("the service", || http(port, "GET", "/", ""));
    env.ok(&["checkpoint", "big"]);
    let list: serde_json::Value = serde_json::from_str(&env.ok(&["checkpoints", "big", "--json"])).unwrap();
    let row = list["checkpoints"].as_array().unwrap().last().unwrap().clone();
    let id = row["id"].as_str().unwrap().to_string();
    assert!(row["size_bytes"].as_u64() > Some(96 << 20), "the memory is in the checkpoint: {row}");
    env.ok(&["stop", "big"]);
    let back: serde_json::Value = serde_json::from_str(&env.ok(&["start", "big", "--from", &id, "--json"])).unwrap();
    assert_eq!(back["started_from"], "checkpoint", "the images verified: {back}");
    assert_eq!(http(port, "GET", "/", "").as_deref(), Some(before.as_str()), "the same memory");
    env.ok(&["stop", "big"]);
}
