//! A host's worth of services at once: 40 parallel cold starts on a busy CPU, then parallel
//! kill-port checkpoints through the host's dump slots, then parallel restores; a dump slot is
//! freed when its holder is SIGKILLed; a hung restore ends after `restore_timeout` with a bounded
//! log; `stop --all` / `start --all` with one failing service.
//!
//! Every port is picked free at run time (`free_ports`).

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const SERVICES: u16 = 40;
const ROUNDS: usize = 5;

fn redis_yaml(port: u16, kill_port: u16) -> String {
    format!(
        "command: [\"/usr/bin/redis-server\", \"--port\", \"{port}\", \"--save\", \"\", \"--appendonly\", \"no\", \"--daemonize\", \"no\"]\nuser: redis\nkill_port: {kill_port}\n"
    )
}

fn redis(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn all_json(env: &Env, args: &[&str]) -> (i32, Value) {
    let out = env.run(args);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?} prints JSON: {e}"));
    (out.status.code().unwrap_or(-1), v)
}

fn rows(v: &Value) -> &Vec<Value> {
    v["services"].as_array().expect("a services array")
}

/// Busy loops on every core until dropped: boot-time contention.
struct Load(Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>);
impl Load {
    fn new(threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        std::hint::black_box(x);
                    }
                })
            })
            .collect();
        Load(stop, handles)
    }
}
impl Drop for Load {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        for h in self.1.drain(..) {
            let _ = h.join();
        }
    }
}

#[test]
fn forty_parallel_starts_on_a_busy_cpu_then_checkpoints_and_restores_five_rounds() {
    for round in 0..ROUNDS {
        eprintln!("=== round {round}");
        // Each round from an empty state dir, so every start races to install the init copy.
        let env = Env::new();
        // Redis ports first, then the kill ports.
        let ports = free_ports::<{ 2 * SERVICES as usize }>();
        let redis_port = |i: u16| ports[i as usize];
        let names: Vec<String> = (0..SERVICES).map(|i| format!("r{i:02}")).collect();
        for (i, n) in names.iter().enumerate() {
            env.write_service(n, &redis_yaml(ports[i], ports[SERVICES as usize + i]));
            env.adopt(n);
        }
        let (code, started) = {
            let _busy = Load::new(4);
            all_json(&env, &["start", "--all", "--json"])
        };
        assert_eq!(code, 0, "every cold start works: {started}");
        assert_eq!(rows(&started).len(), SERVICES as usize);
        assert!(rows(&started).iter().all(|r| r["ok"] == true && r["started_from"] == "cold"), "{started}");
        for i in 0..SERVICES {
            let port = redis_port(i);
            wait_for("redis", || redis(port, &["PING"]).filter(|p| p == "PONG"));
            assert_eq!(redis(port, &["SET", "owner", &names[i as usize]]).as_deref(), Some("OK"));
        }

        let (code, stopped) = all_json(&env, &["stop", "--all", "--json"]);
        assert_eq!(code, 0, "every checkpoint works: {stopped}");
        assert_eq!(rows(&stopped).len(), SERVICES as usize);
        for r in rows(&stopped) {
            assert!(r["ok"] == true && r["checkpoint"].is_string() && r["bytes"].as_u64() > Some(0), "{r}");
        }
        for i in 0..SERVICES {
            assert!(redis(redis_port(i), &["PING"]).is_none(), "r{i:02} is stopped");
        }

        let (code, restored) = all_json(&env, &["start", "--all", "--json"]);
        assert_eq!(code, 0, "every restore works: {restored}");
        assert!(rows(&restored).iter().all(|r| r["ok"] == true && r["started_from"] == "checkpoint"), "{restored}");
        for i in 0..SERVICES {
            let port = redis_port(i);
            wait_for("restored redis", || redis(port, &["PING"]).filter(|p| p == "PONG"));
            assert_eq!(
                redis(port, &["GET", "owner"]),
                Some(names[i as usize].clone()),
                "each service has its own keys"
            );
        }
        let copies: Vec<_> = std::fs::read_dir(env.state_dir().join("bin")).unwrap().filter_map(Result::ok).collect();
        assert_eq!(copies.len(), 1, "one init copy, no leftovers of lost races: {copies:?}");
        let (code, _) = all_json(&env, &["stop", "--all", "--json"]);
        assert_eq!(code, 0);
    }
}

/// A CRIU for `env` that is the real one, plus an action script when it works for `service`:
/// `hang` (its post-dump step hangs, like a stuck disk) or `fail` (it fails). No service file
/// may name an action script (CRIU would run it as root), so the test wraps the binary, as
/// root may, and hands it to the supervisors through STASIS_CRIU.
fn criu_with_action_script(env: &Env, service: &str, action: &str) -> PathBuf {
    let real = which::which_in("criu", Some("/usr/local/sbin:/usr/sbin:/sbin"), "/").expect("criu");
    let script = env.path().join(format!("{action}.sh"));
    let step = if action == "hang" { "exec sleep 601" } else { "exit 1" };
    std::fs::write(&script, format!("#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] && {step}\nexit 0\n"))
        .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let wrapper = env.path().join(format!("criu-{action}"));
    let (real, script) = (real.display(), script.display());
    std::fs::write(
        &wrapper,
        // A dump is a `criu swrk` conversation; a wrapper has only the supervisor (its parent) to
        // tell whose: `__supervise NAME` is on its command line.
        format!("#!/bin/sh\ncase \"$*\" in *swrk*) if tr '\\0' ' ' </proc/$PPID/cmdline | grep -q -- '__supervise {service} '; then exec {real} \"$@\" --action-script {script}; fi ;; esac\nexec {real} \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    wrapper
}

/// Lines a running `stasis stop` prints, as they come.
fn spawn_stop(env: &Env, name: &str) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = env.cmd(&["stop", name]).stdout(Stdio::piped()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("stop: {line}");
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Processes whose command line contains every marker.
fn pids_with(markers: &[&str]) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let c = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
                .replace('\0', " ");
            markers.iter().all(|m| c.contains(m))
        })
        .collect()
}

#[test]
fn a_supervisor_killed_while_it_holds_the_dump_slot_frees_it() {
    let env = Env::new();
    let hanging = criu_with_action_script(&env, "holder", "hang");
    std::fs::write(env.path().join("stasis.yaml"), "max_concurrent_dumps: 1\n").unwrap();
    let [holder_kill, holder_http, waiter_kill, waiter_http] = free_ports::<4>();
    env.write_service("holder", &notes_yaml(holder_kill, holder_http, "dump_timeout: 10m\n"));
    env.write_service("waiter", &notes_yaml(waiter_kill, waiter_http, ""));
    env.adopt("holder");
    assert!(env.cmd(&["start", "holder"]).env("STASIS_CRIU", &hanging).status().unwrap().success());
    env.adopt("waiter");
    assert!(env.cmd(&["start", "waiter"]).status().unwrap().success());
    wait_for("holder", || http_json(holder_http));
    wait_for("waiter", || http_json(waiter_http));
    http(waiter_http, "POST", "/notes", "kept").unwrap();

    // Whatever happens, the hung CRIU of the holder ends with the test (criu leads its own group,
    // which holds its action script too).
    struct EndHungDumps(String);
    impl Drop for EndHungDumps {
        fn drop(&mut self) {
            for pid in pids_with(&["criu", "dump", &self.0]) {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    let hung = EndHungDumps(env.service_dir("holder").display().to_string());
    let (mut holder_stop, _) = spawn_stop(&env, "holder");
    wait_for("the holder's dump to hang in its slot", || {
        (env.status("holder")["state"] == "checkpointing").then_some(())
    });
    let (mut queued_stop, lines) = spawn_stop(&env, "waiter");
    let waiting =
        wait_for("the queued stop to be told it waits", || lines.try_recv().ok().filter(|l| l.starts_with("Waiting:")));
    assert_eq!(waiting, "Waiting: 1 checkpoint ahead of waiter (max_concurrent_dumps: 1)");
    assert_eq!(env.status("waiter")["state"], "queued");
    let list = env.ok(&["list"]);
    let state_of = |name: &str| {
        list.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).map(str::to_string)
    };
    assert_eq!(state_of("waiter").as_deref(), Some("queued"), "{list}");
    assert_eq!(state_of("holder").as_deref(), Some("checkpointing"), "{list}");

    let supervisor = pid_in(&env.status("holder")["supervisor_pid"]).unwrap();
    let state_dir = env.state_dir().display().to_string();
    verified_kill(supervisor, &["__supervise", "holder", &state_dir]);
    assert!(queued_stop.wait().unwrap().success(), "the slot came free when its holder died");
    let restored = env.start("waiter");
    assert_eq!(restored["started_from"], "checkpoint");
    assert_eq!(wait_for("restored", || http_json(waiter_http))["notes"], serde_json::json!(["kept"]));

    drop(hung);
    let _ = holder_stop.wait();
    env.ok(&["stop", "waiter"]);
}

#[test]
fn a_hung_restore_ends_after_restore_timeout_with_a_cold_start_and_a_bounded_log() {
    let env = Env::new();
    let real = which::which_in("criu", Some("/usr/local/sbin:/usr/sbin:/sbin"), "/").expect("criu");
    // A stand-in whose restore spins forever, logging as fast as it can, as CRIU's restorer did
    // at EOF of a truncated pages image; everything else is the real CRIU. A dump and a restore
    // are both a `criu swrk` conversation, so the test says when restores begin (a marker file).
    let standin = env.path().join("criu");
    let restoring = env.path().join("restoring");
    std::fs::write(
        &standin,
        format!(
            "#!/bin/sh\nif [ -e {} ]; then exec yes '(00.100000) pie: 1: re-reading the pages image at EOF' >&2; fi\nexec {} \"$@\"\n",
            restoring.display(),
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&standin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("hung", &notes_yaml(kill, http_port, "restore_timeout: 3s\n"));
    // The stand-in is for restores: no criu started ahead of a dump may be it.
    std::fs::write(env.path().join("stasis.yaml"), "warm_criu: off\n").unwrap();
    let run = |args: &[&str]| {
        let mut c = env.cmd(args);
        c.env("STASIS_CRIU", &standin);
        logged(args, c)
    };
    env.adopt("hung");
    assert!(run(&["start", "hung"]).status.success());
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "lost").unwrap();
    assert!(run(&["stop", "hung"]).status.success());
    let id = env.checkpoint_dirs("hung").pop().unwrap().file_name().unwrap().to_string_lossy().to_string();
    std::fs::write(&restoring, b"").unwrap();

    let out = run(&["start", "hung", "--json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["started_from"], "cold", "a hung restore ends in a cold start");
    let reason = v["fallback_reason"].as_str().unwrap();
    assert!(reason.contains(&id) && reason.contains("restore_timeout"), "{reason}");
    assert_eq!(wait_for("cold service", || http_json(http_port))["notes"], serde_json::json!([]));
    let q = env.service_dir("hung").join("quarantine").join(&id);
    let log = q.join("restore.log");
    let size = std::fs::metadata(&log).expect("the restore log is kept").len();
    assert!(size > 1 << 20, "the spinning restore did log ({size} bytes)");
    assert!(size < 13 << 20, "the log is bounded: {size} bytes");
    let text = std::fs::read(&log).unwrap();
    assert!(String::from_utf8_lossy(&text).contains("bytes of CRIU's log were left out here"));
    let supervisor = pid_in(&env.status("hung")["supervisor_pid"]).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{supervisor}/status")).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(peak_kb < 128 * 1024, "the supervisor never held the log in memory: peak RSS {peak_kb} kB");
    assert!(pids_with(&["yes", "re-reading the pages image"]).is_empty(), "the stand-in restore was killed");
    // Restores are over: the stop's dump goes to the real CRIU again.
    std::fs::remove_file(&restoring).unwrap();
    assert!(run(&["stop", "hung"]).status.success());
}

#[test]
fn stop_all_and_start_all_keep_going_past_a_failing_service() {
    let env = Env::new();
    let failing = criu_with_action_script(&env, "beta", "fail");
    let [alpha_kill, alpha_http, beta_kill, beta_http, gamma_kill, gamma_http] = free_ports::<6>();
    env.write_service("alpha", &notes_yaml(alpha_kill, alpha_http, ""));
    env.write_service("beta", &notes_yaml(beta_kill, beta_http, ""));
    env.write_service("gamma", &notes_yaml(gamma_kill, gamma_http, ""));
    let run = |args: &[&str]| {
        let mut c = env.cmd(args);
        c.env("STASIS_CRIU", &failing);
        logged(args, c)
    };
    for n in ["alpha", "beta", "gamma"] {
        env.adopt(n);
    }
    let out = run(&["start", "--all"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for n in ["alpha", "beta", "gamma"] {
        assert!(text.lines().any(|l| l.starts_with(n) && l.contains("OK") && l.contains("cold start")), "{text}");
    }
    assert!(text.contains("started 3 of 3 services"), "{text}");
    for (port, note) in [(alpha_http, "a"), (beta_http, "b"), (gamma_http, "c")] {
        wait_for("service", || http_json(port));
        http(port, "POST", "/notes", note).unwrap();
    }

    let out = run(&["stop", "--all", "--json"]);
    assert_eq!(out.status.code(), Some(5), "a failed checkpoint makes stop --all fail");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_name = |n: &str| rows(&v).iter().find(|r| r["name"] == n).unwrap_or_else(|| panic!("{n} in {v}")).clone();
    for n in ["alpha", "gamma"] {
        let r = by_name(n);
        assert!(r["ok"] == true && r["checkpoint"].is_string() && r["bytes"].as_u64() > Some(0), "{r}");
        assert!(r["seconds"].as_f64().is_some(), "{r}");
    }
    let b = by_name("beta");
    assert_eq!(b["ok"], false, "{b}");
    assert!(b["error"].as_str().is_some_and(|e| e.contains("keeps running")), "{b}");
    assert_eq!(http_json(beta_http).expect("beta still runs")["notes"], serde_json::json!(["b"]));

    let out = run(&["stop", "--all"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed: beta"), "the failed one is named");

    let out = run(&["start", "--all", "--json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = rows(&v).iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "gamma"], "only the stopped ones are started");
    assert!(rows(&v).iter().all(|r| r["started_from"] == "checkpoint"), "{v}");
    assert_eq!(wait_for("alpha", || http_json(alpha_http))["notes"], serde_json::json!(["a"]));
    assert_eq!(wait_for("gamma", || http_json(gamma_http))["notes"], serde_json::json!(["c"]));
    assert_eq!(env.status("beta")["state"], "running", "beta kept running through both failed stops");
}
