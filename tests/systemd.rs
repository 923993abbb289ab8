//! stasis under a real systemd (252, Debian bookworm) in systemd-nspawn, through the harness in
//! scripts/nspawn: installed with scripts/install, a redis service added with `stasis add`,
//! run as `stasis@redis`, checkpointed by `systemctl reboot` and restored at boot with every
//! key; a good stop leaves the unit inactive; a failing dump fails the stop visibly and the
//! service is still stopped.
//!
//! Its ports (redis 6390, kill port 7390) are fixed: they are the container's own, behind
//! `--private-network`, where nothing of the host can hold them.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;

const NSPAWN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/nspawn");

fn nspawn(script: &str, args: &[&str]) -> Output {
    let out = Command::new(Path::new(NSPAWN).join(script)).args(args).output().expect(script);
    eprintln!(
        "$ nspawn/{script} {}\n  exit {:?}\n  stdout: {}\n  stderr: {}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// Once per test binary: the cached root filesystem (built when missing) with the host's CRIU.
fn rootfs() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        require_host();
        destroy_abandoned();
        assert!(nspawn("build-rootfs", &[]).status.success(), "build-rootfs failed");
        assert!(nspawn("install-host-criu", &[]).status.success(), "install-host-criu failed");
    });
}

/// Containers of this suite (`st-TEST-PID`) whose test process is gone: a run killed before its
/// drops ran left them mounted, and a rootfs in use as an overlay's lower dir cannot be given
/// the host's CRIU. Only names of this suite's form whose pid no longer runs a test binary.
fn destroy_abandoned() {
    let dir = std::env::var("STASIS_NSPAWN_DIR").unwrap_or_else(|_| "/var/tmp/stasis-nspawn".into());
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) =
            name.strip_prefix("st-").and_then(|r| r.rsplit_once('-')).and_then(|(_, p)| p.parse::<u32>().ok())
        else {
            continue;
        };
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let ours_running = exe.file_name().is_some_and(|f| f.to_string_lossy().starts_with("systemd-"));
        if !ours_running {
            eprintln!("destroying the abandoned container {name} (its test process {pid} is gone)");
            let _ = nspawn("destroy", &["--kill", &name]);
        }
    }
}

struct Container(String);

impl Container {
    /// A booted container with stasis installed by the install command.
    fn new(test: &str) -> Container {
        rootfs();
        let c = Container(format!("st-{test}-{}", std::process::id()));
        let _ = nspawn("destroy", &["--kill", &c.0]);
        let out = nspawn("prepare", &[&c.0]);
        assert!(out.status.success(), "prepare failed");
        let root = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let install = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install"))
            .args(["--destdir", &root, "--binary", BIN])
            .output()
            .unwrap();
        assert!(install.status.success(), "install: {}", String::from_utf8_lossy(&install.stderr));
        assert!(nspawn("boot", &[&c.0]).status.success(), "boot failed");
        c
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut a = vec![self.0.as_str()];
        a.extend_from_slice(args);
        nspawn("exec", &a)
    }

    /// Runs a command inside and returns its stdout, asserting success.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(out.status.success(), "{args:?} failed inside the container");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn unit_state(&self, unit: &str) -> String {
        String::from_utf8_lossy(&self.exec(&["systemctl", "is-active", unit]).stdout).trim().to_string()
    }

    fn wait_active(&self, unit: &str) {
        wait_for(&format!("{unit} to be active"), || {
            let s = self.unit_state(unit);
            assert!(s != "failed", "{unit} failed:\n{}", self.journal(unit, false));
            (s == "active").then_some(())
        });
    }

    fn journal(&self, unit: &str, previous_boot: bool) -> String {
        let mut args = vec!["journalctl", "--no-pager", "-o", "cat", "-u", unit];
        if previous_boot {
            args.extend(["-b", "-1"]);
        }
        String::from_utf8_lossy(&self.exec(&args).stdout).to_string()
    }

    fn status_text(&self, unit: &str) -> String {
        self.ok(&["systemctl", "show", "-p", "StatusText", "--value", unit])
    }

    fn redis(&self, args: &[&str]) -> Option<String> {
        let mut a = vec!["redis-cli", "-p", "6390"];
        a.extend_from_slice(args);
        let out = self.exec(&a);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A redis service set up as an ops person would: `stasis add`, then systemctl.
    fn add_redis(&self) {
        self.ok(&[
            "stasis",
            "add",
            "redis",
            "--user",
            "redis",
            "--kill-port",
            "7390",
            "--",
            "/usr/bin/redis-server",
            "--port",
            "6390",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        self.ok(&["systemctl", "enable", "--now", "stasis@redis"]);
        self.wait_active("stasis@redis.service");
        wait_for("redis to answer", || self.redis(&["PING"]).filter(|p| p == "PONG"));
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = nspawn("destroy", &["--kill", &self.0]);
    }
}

#[test]
fn units_verify_without_warnings() {
    let c = Container::new("verify");
    for unit in ["/usr/local/lib/systemd/system/stasis@.service", "stasis@redis.service"] {
        let out = c.exec(&["systemd-analyze", "verify", unit]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify {unit}:\n{stderr}");
    }
}

#[test]
fn redis_survives_a_reboot_through_checkpoint_and_restore() {
    let c = Container::new("reboot");
    c.add_redis();
    assert!(c.status_text("stasis@redis").contains("cold start"), "{}", c.status_text("stasis@redis"));
    let loaded = c.redis(&[
        "EVAL",
        "for i=0,9999 do redis.call('SET','key:'..i,'value-'..i) end return redis.call('DBSIZE')",
        "0",
    ]);
    assert_eq!(loaded.as_deref(), Some("10000"));

    assert!(nspawn("reboot", &[&c.0]).status.success(), "systemctl reboot and boot again");
    c.wait_active("stasis@redis.service");
    let status = c.status_text("stasis@redis");
    assert!(status.contains("restored from checkpoint"), "after the reboot: {status}");
    wait_for("redis to answer after the reboot", || c.redis(&["PING"]).filter(|p| p == "PONG"));
    assert_eq!(c.redis(&["DBSIZE"]).as_deref(), Some("10000"), "every key survived the reboot");
    assert_eq!(c.redis(&["GET", "key:1234"]).as_deref(), Some("value-1234"));
    let before = c.journal("stasis@redis", true);
    assert!(before.contains("Saving checkpoint of redis"), "the shutdown checkpoint is in the journal:\n{before}");
    assert!(before.contains("OK checkpoint"), "{before}");
    let now = c.journal("stasis@redis", false);
    assert!(now.contains("restored from checkpoint"), "{now}");
    let st: serde_json::Value = serde_json::from_str(&c.ok(&["stasis", "status", "redis", "--json"])).unwrap();
    assert_eq!(st["started_from"], "checkpoint");
    assert_eq!(st["state"], "running");

    // A plain stop after a good checkpoint: inactive, not failed.
    c.ok(&["systemctl", "stop", "stasis@redis"]);
    assert_eq!(c.unit_state("stasis@redis.service"), "inactive");
    assert!(c.redis(&["PING"]).is_none(), "redis is gone");
    c.ok(&["systemctl", "start", "stasis@redis"]);
    c.wait_active("stasis@redis.service");
    assert_eq!(c.redis(&["DBSIZE"]).as_deref(), Some("10000"));

    // poweroff, then a cold boot of the same disk: the same story.
    c.ok(&["redis-cli", "-p", "6390", "SET", "written-before-poweroff", "yes"]);
    let off = nspawn("shutdown", &[&c.0, "poweroff"]);
    assert!(off.status.success(), "systemctl poweroff completes");
    assert!(nspawn("boot", &[&c.0]).status.success(), "boot again");
    c.wait_active("stasis@redis.service");
    assert!(c.status_text("stasis@redis").contains("restored from checkpoint"));
    wait_for("redis after the power cycle", || c.redis(&["PING"]).filter(|p| p == "PONG"));
    assert_eq!(c.redis(&["GET", "written-before-poweroff"]).as_deref(), Some("yes"));
    assert_eq!(c.redis(&["DBSIZE"]).as_deref(), Some("10001"));
}

#[test]
fn a_failing_dump_fails_the_stop_visibly_and_still_stops_the_service() {
    let c = Container::new("faildump");
    c.add_redis();
    c.ok(&["redis-cli", "-p", "6390", "SET", "k", "v"]);
    // The disk holding the checkpoints is full.
    let checkpoints = "/var/lib/stasis/services/redis/checkpoints";
    c.ok(&["mkdir", "-p", checkpoints]);
    c.ok(&["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", checkpoints]);
    let stop = c.exec(&["systemctl", "stop", "stasis@redis"]);
    let _ = stop;
    let state = c.unit_state("stasis@redis.service");
    assert_eq!(state, "failed", "a failed checkpoint makes the stop fail visibly");
    assert!(c.redis(&["PING"]).is_none(), "the service was stopped the ordinary way");
    let journal = c.journal("stasis@redis", false);
    assert!(journal.contains("ERROR"), "the reason is in the journal:\n{journal}");
    assert!(journal.contains("No space left on device") || journal.contains("disk"), "{journal}");
    assert!(journal.contains("stopping without a checkpoint"), "{journal}");
    assert!(journal.contains("last-failed-dump.log"), "the journal names CRIU's kept log: {journal}");
    assert!(c.exec(&["test", "-s", "/var/lib/stasis/services/redis/last-failed-dump.log"]).status.success());
    c.ok(&["umount", checkpoints]);
    c.ok(&["systemctl", "reset-failed", "stasis@redis"]);

    // The same failure during a reboot does not block it: the machine goes down and comes back.
    c.ok(&["systemctl", "start", "stasis@redis"]);
    c.wait_active("stasis@redis.service");
    c.ok(&["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", checkpoints]);
    assert!(nspawn("reboot", &[&c.0]).status.success(), "the reboot completes despite the failed checkpoint");
    let before = c.journal("stasis@redis", true);
    assert!(before.contains("ERROR") && before.contains("stopping without a checkpoint"), "{before}");
    c.wait_active("stasis@redis.service");
    assert!(c.status_text("stasis@redis").contains("cold start"), "no checkpoint was taken, so a cold start");
}

/// A dump that takes longer than the unit's stop timeout is not killed half-way: the supervisor
/// keeps extending the timeout (EXTEND_TIMEOUT_USEC) while it dumps.
#[test]
fn a_long_dump_outlives_a_short_stop_timeout() {
    let c = Container::new("extend");
    c.add_redis();
    // About 1 GiB of values: the dump (and its fsync) takes seconds on this machine.
    for i in 0..2 {
        let out =
            c.redis(&["EVAL", &format!("redis.call('SET','big{i}',string.rep('x{i}',128*1024*1024)) return 1"), "0"]);
        assert_eq!(out.as_deref(), Some("1"));
    }
    let dropin = "/etc/systemd/system/stasis@redis.service.d";
    c.ok(&["mkdir", "-p", dropin]);
    c.ok(&["sh", "-c", &format!("printf '[Service]\\nTimeoutStopSec=1\\n' > {dropin}/short-timeout.conf")]);
    c.ok(&["systemctl", "daemon-reload"]);
    assert!(c.ok(&["systemctl", "show", "-p", "TimeoutStopUSec", "--value", "stasis@redis"]).contains("1s"));
    c.ok(&["systemctl", "stop", "stasis@redis"]);
    assert_eq!(c.unit_state("stasis@redis.service"), "inactive", "{}", c.journal("stasis@redis", false));
    let journal = c.journal("stasis@redis", false);
    assert!(journal.contains("OK checkpoint"), "{journal}");
    assert!(!journal.contains("timed out"), "{journal}");
    c.ok(&["systemctl", "start", "stasis@redis"]);
    c.wait_active("stasis@redis.service");
    assert_eq!(c.redis(&["STRLEN", "big1"]).as_deref(), Some("268435456"), "the big values came back");
}
