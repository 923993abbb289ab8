//! Periodic checkpoints (`checkpoint_every`) and crash recovery (`restart`, `restart_from`):
//! a service that dies comes back from minutes ago, not from zero; a checkpoint whose restored
//! service dies again is passed over for an older one, then a cold start; past `restart_limit`
//! the supervisor gives up and says so; a disk without room skips the periodic checkpoint.
//! Every port is picked free at run time.

mod common;
use common::*;
use std::process::Command;

fn redis_yaml(port: u16, kill_port: u16, extra: &str) -> String {
    format!(
        "command: [\"/usr/bin/redis-server\", \"--port\", \"{port}\", \"--bind\", \"127.0.0.1\", \"--save\", \"\", \"--appendonly\", \"no\"]\nuser: redis\nkill_port: {kill_port}\n{extra}"
    )
}

fn checkpoints(env: &Env, name: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["checkpoints", name, "--json"])).unwrap();
    v["checkpoints"].as_array().cloned().unwrap_or_default()
}

#[test]
fn periodic_checkpoints_are_taken_while_the_service_keeps_its_pid_and_answers() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("ticker", &redis_yaml(port, kill, "checkpoint_every: 1s\n"));
    env.start("ticker");
    wait_for("redis", || redis_cli(port, &["PING"]).filter(|r| r == "PONG"));
    let pid = env.status("ticker")["pid"].as_i64().unwrap();
    redis_cli(port, &["SET", "answer", "42"]).unwrap();
    let taken = wait_for("two periodic checkpoints", || {
        let c = checkpoints(&env, "ticker");
        (c.len() >= 2).then_some(c)
    });
    for c in &taken {
        assert_eq!(c["kind"], "periodic", "{c}");
        assert_eq!(c["fresh"], false, "the service ran on after it: stale by the freshness rule: {c}");
        assert!(
            c["timings"]["freeze_ms"].as_u64().is_some() && c["timings"]["bytes_written"].as_u64() > Some(0),
            "{c}"
        );
    }
    assert_eq!(env.status("ticker")["pid"].as_i64().unwrap(), pid, "the service kept its pid");
    assert_eq!(redis_cli(port, &["GET", "answer"]).as_deref(), Some("42"), "and answers");
    // Incremental dumps need soft-dirty tracking; the log says what each periodic one is.
    let log = env.log("ticker");
    assert!(log.contains("periodic checkpoints every 1s: each one a full dump"), "{log}");
    let metrics = env.ok(&["metrics"]);
    assert!(metrics.contains("stasis_checkpoints_total{service=\"ticker\"}"), "{metrics}");
    // A stop still takes its own checkpoint, which the next start restores.
    env.ok(&["stop", "ticker"]);
    let back = env.start("ticker");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    assert_eq!(redis_cli(port, &["GET", "answer"]).as_deref(), Some("42"));
    env.ok(&["stop", "ticker"]);
}

#[test]
fn a_killed_service_comes_back_by_itself_from_its_newest_checkpoint() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service(
        "phoenix",
        &redis_yaml(
            port,
            kill,
            "checkpoint_every: 1s\nrestart: on-failure\nrestart_from: checkpoint\nrestart_backoff: 100ms\n",
        ),
    );
    env.start("phoenix");
    wait_for("redis", || redis_cli(port, &["PING"]).filter(|r| r == "PONG"));
    redis_cli(port, &["SET", "survivor", "yes"]).unwrap();
    // A checkpoint begun after the write holds it.
    let before: Vec<serde_json::Value> = checkpoints(&env, "phoenix").iter().map(|c| c["id"].clone()).collect();
    let newest = wait_for("a periodic checkpoint after the write", || {
        checkpoints(&env, "phoenix").last().filter(|c| !before.contains(&c["id"])).cloned()
    });
    let st = env.status("phoenix");
    let pid = pid_in(&st["pid"]).unwrap();
    verified_kill(pid, &["redis-server", &format!("127.0.0.1:{port}")]);
    let back = wait_for("the service back after the kill", || {
        let s = env.status("phoenix");
        (s["restarts"] == 1 && s["state"] == "running").then_some(s)
    });
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    assert_ne!(pid_in(&back["pid"]), Some(pid));
    assert!(back["restored_checkpoint"].as_str() >= newest["id"].as_str(), "{back} vs {newest}");
    wait_for("redis", || redis_cli(port, &["PING"]).filter(|r| r == "PONG"));
    assert_eq!(redis_cli(port, &["GET", "survivor"]).as_deref(), Some("yes"), "the memory of before the crash");
    let log = env.log("phoenix");
    assert!(
        log.contains(
            "the service exited with status 137 (its command was killed by SIGKILL); restarting it in 100ms (restart 1"
        ),
        "{log}"
    );
    assert!(env.ok(&["metrics"]).contains("stasis_restarts_total{service=\"phoenix\"} 1"));
    env.ok(&["stop", "phoenix"]);
}

/// A tiny HTTP service holding one word of state in memory (`GET /` says it, `POST /WORD` sets
/// it; a cold start says `cold`), that exits with status 3 as soon as its state is one of the
/// words in the poison file: a checkpoint holding such a state is poisoned.
fn poisonable_yaml(kill_port: u16, http: u16, poison: &std::path::Path) -> String {
    let script = format!(
        "import http.server, os, threading, time\\n\
         state = ['cold']\\n\
         def watch():\\n\
         \\x20   while True:\\n\
         \\x20       try:\\n\
         \\x20           bad = open('{p}').read().split()\\n\
         \\x20       except OSError:\\n\
         \\x20           bad = []\\n\
         \\x20       if state[0] in bad:\\n\
         \\x20           os._exit(3)\\n\
         \\x20       time.sleep(0.05)\\n\
         class H(http.server.BaseHTTPRequestHandler):\\n\
         \\x20   def do_GET(self):\\n\
         \\x20       self.send_response(200); self.end_headers(); self.wfile.write(state[0].encode())\\n\
         \\x20   def do_POST(self):\\n\
         \\x20       state[0] = self.path.strip('/'); self.send_response(200); self.end_headers()\\n\
         \\x20   def log_message(self, *a):\\n\
         \\x20       pass\\n\
         threading.Thread(target=watch, daemon=True).start()\\n\
         http.server.HTTPServer(('127.0.0.1', {http}), H).serve_forever()\\n",
        p = poison.display()
    );
    format!(
        "command: [\"/usr/bin/python3\", \"-c\", \"{script}\"]\nuser: stasis-example\nkill_port: {kill_port}\nrestart: on-failure\nrestart_from: checkpoint\nrestart_backoff: 100ms\nrestart_limit: 10 in 1m\n"
    )
}

fn state_of(port: u16) -> Option<String> {
    http(port, "GET", "/", "")
}

#[test]
fn a_checkpoint_whose_restore_dies_again_is_passed_over_for_the_previous_then_cold() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    let poison = env.path().join("poison");
    env.write_service("fragile", &poisonable_yaml(kill, http_port, &poison));
    env.start("fragile");
    wait_for("the service", || state_of(http_port).filter(|s| s == "cold"));
    http(http_port, "POST", "/alpha", "").unwrap();
    env.ok(&["checkpoint", "fragile"]);
    http(http_port, "POST", "/beta", "").unwrap();
    env.ok(&["checkpoint", "fragile"]);
    let ids: Vec<String> = checkpoints(&env, "fragile").iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 2);
    // beta crashes: the restart restores the newest (beta), which crashes again; then alpha.
    std::fs::write(&poison, "beta").unwrap();
    let st = wait_for("back on the older checkpoint", || {
        let s = env.status("fragile");
        (s["state"] == "running" && s["restored_checkpoint"] == ids[0].as_str()).then_some(s)
    });
    assert_eq!(st["restarts"], 2, "one restart on beta, one on alpha: {st}");
    assert_eq!(state_of(http_port).as_deref(), Some("alpha"));
    // Now alpha is poison too: its restored run dies, and the next restart is cold.
    std::fs::write(&poison, "alpha beta").unwrap();
    let st = wait_for("back cold", || {
        let s = env.status("fragile");
        (s["state"] == "running" && s["started_from"] == "cold").then_some(s)
    });
    assert_eq!(st["restarts"], 3, "{st}");
    assert_eq!(state_of(http_port).as_deref(), Some("cold"));
    let log = env.log("fragile");
    assert!(log.contains("was restored before and the service exited again; skipped it"), "{log}");
    std::fs::remove_file(&poison).unwrap();
    env.ok(&["stop", "fragile"]);
}

#[test]
fn past_restart_limit_the_supervisor_gives_up_and_says_so() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    env.write_service(
        "flaky",
        &format!("command: [\"/bin/sh\", \"-c\", \"echo up; sleep 1.2; echo down; exit 1\"]\nuser: stasis-example\nkill_port: {kill}\nrestart: on-failure\nrestart_backoff: 100ms\nrestart_limit: 2 in 1m\n"),
    );
    env.start("flaky");
    let st = wait_for("the supervisor to give up", || {
        let s = env.status("flaky");
        (s["state"] == "failed" && s["supervisor_pid"].is_null()).then_some(s)
    });
    let msg = st["message"].as_str().unwrap_or_default();
    assert!(msg.contains("gave up") && msg.contains("restart_limit: 2 in 1m"), "{st}");
    assert_eq!(st["restarts"], 2, "{st}");
    assert_eq!(env.log("flaky").matches("down").count(), 3, "the first run and two restarts");
    // Given up is given up: a new start is an ordinary one.
    let again = env.start("flaky");
    assert_eq!(again["started_from"], "cold");
}

#[test]
fn a_clean_exit_under_on_failure_is_not_restarted() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    env.write_service(
        "done",
        &format!("command: [\"/bin/sh\", \"-c\", \"sleep 1.2; exit 0\"]\nuser: stasis-example\nkill_port: {kill}\nrestart: on-failure\nrestart_backoff: 100ms\n"),
    );
    env.start("done");
    let st = wait_for("the service to end", || {
        let s = env.status("done");
        (s["supervisor_pid"].is_null() && s["state"] != "running").then_some(s)
    });
    assert_eq!(st["restarts"], 0, "{st}");
    assert!(st["message"].as_str().unwrap_or_default().contains("exited with status 0"), "{st}");
}

/// The state directory on a tmpfs this small, unmounted (after the services are killed) at the end.
struct SmallDisk {
    env: Option<Env>,
    root: std::path::PathBuf,
}

impl SmallDisk {
    fn new(mib: u32) -> SmallDisk {
        let env = Env::new();
        let state = env.state_dir();
        std::fs::create_dir_all(&state).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "stasis-test-small",
                &state.display().to_string(),
            ])
            .status()
            .unwrap();
        assert!(ok.success(), "mount a tmpfs on {}", state.display());
        SmallDisk { root: env.path().to_path_buf(), env: Some(env) }
    }

    fn env(&self) -> &Env {
        self.env.as_ref().unwrap()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let state = self.env().state_dir();
        drop(self.env.take());
        // Lazily: a supervisor still on its way out may hold a file there, and a plain umount
        // would then fail and leave the mount behind on the host.
        let _ = Command::new("umount").arg("-l").arg(&state).status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[test]
fn a_disk_without_room_skips_the_periodic_checkpoint_and_leaves_the_service_alone() {
    let disk = SmallDisk::new(48);
    let env = disk.env();
    let [kill] = free_ports::<1>();
    // 64 MiB of touched memory: its checkpoint cannot fit in 48 MiB.
    env.write_service(
        "hoarder",
        &format!("command: [\"/usr/bin/python3\", \"-c\", \"import os, time\\nb = bytearray(os.urandom(1 << 20)) * 64\\nprint('ready', flush=True)\\ntime.sleep(100000)\"]\nuser: stasis-example\nkill_port: {kill}\ncheckpoint_every: 1s\nmin_free_bytes: 1048576\n"),
    );
    env.start("hoarder");
    wait_for("64 MiB touched", || env.log("hoarder").contains("ready").then_some(()));
    let pid = env.status("hoarder")["pid"].as_i64().unwrap();
    let log = wait_for("a skipped periodic checkpoint", || {
        let l = env.log("hoarder");
        l.contains("periodic checkpoint skipped").then_some(l)
    });
    assert!(log.contains("free, and the checkpoint needs about") && log.contains("min_free_bytes"), "{log}");
    assert!(log.contains(&env.service_dir("hoarder").display().to_string()), "names the directory: {log}");
    assert!(checkpoints(env, "hoarder").is_empty(), "nothing half-written is left");
    let st = env.status("hoarder");
    assert_eq!(st["state"], "running");
    assert_eq!(st["pid"].as_i64().unwrap(), pid, "the service was not touched");
    let metrics = env.ok(&["metrics"]);
    let skipped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("stasis_periodic_checkpoints_skipped_total{service=\"hoarder\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(skipped >= Some(1.0), "{metrics}");
}

#[test]
fn a_stop_during_a_periodic_checkpoint_waits_for_it_then_stops_with_its_own() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    // 512 MiB, so that each periodic dump takes long enough to be caught under way.
    env.write_service(
        "busy",
        &format!("command: [\"/usr/bin/python3\", \"-c\", \"import os, time\\nb = bytearray(os.urandom(1 << 20)) * 512\\nprint('ready', flush=True)\\ntime.sleep(100000)\"]\nuser: stasis-example\nkill_port: {kill}\ncheckpoint_every: 1s\n"),
    );
    env.start("busy");
    wait_for("512 MiB touched", || env.log("busy").contains("ready").then_some(()));
    wait_for("a periodic checkpoint under way", || (env.status("busy")["state"] == "checkpointing").then_some(()));
    let out = env.ok(&["stop", "busy"]);
    assert!(
        out.contains("Waiting: a checkpoint of busy that keeps it running is under way; the stop follows it"),
        "{out}"
    );
    assert!(out.lines().last().unwrap().starts_with("OK checkpoint"), "{out}");
    let cps = checkpoints(&env, "busy");
    let last = cps.last().unwrap();
    assert_eq!(last["kind"], "stop", "the stop got a checkpoint of its own: {cps:?}");
    assert_eq!(last["fresh"], true);
    assert_eq!(env.status("busy")["state"], "stopped");
}

/// `max_freeze_ms`: a checkpoint that froze the service longer is logged and counted in the
/// metrics; the service is not touched.
#[test]
fn a_checkpoint_over_max_freeze_ms_is_warned_about_and_counted() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("budget", &redis_yaml(port, kill, "max_freeze_ms: 1\n"));
    env.start("budget");
    wait_for("redis", || redis_cli(port, &["ping"]).filter(|r| r == "PONG"));
    let counted = |env: &Env| {
        env.ok(&["metrics"])
            .lines()
            .find(|l| l.starts_with("stasis_freeze_over_budget_total{service=\"budget\"}"))
            .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(counted(&env), 0, "nothing over budget yet");
    let pid = env.status("budget")["pid"].clone();
    env.ok(&["checkpoint", "budget"]);
    let froze =
        checkpoints(&env, "budget").last().unwrap()["timings"]["freeze_ms"].as_u64().expect("freeze_ms recorded");
    assert!(froze > 1, "a redis freeze takes more than 1 ms: {froze}");
    wait_for("the warning in the service log", || {
        env.log("budget")
            .contains(&format!("froze the service for {froze} ms, more than max_freeze_ms (1 ms)"))
            .then_some(())
    });
    assert_eq!(counted(&env), 1, "counted once");
    assert_eq!(env.status("budget")["pid"], pid, "the service runs on");
    assert_eq!(redis_cli(port, &["ping"]).as_deref(), Some("PONG"));
    env.ok(&["stop", "budget"]);
}
