//! Shared harness for the integration tests: each test gets private config/state/run dirs and
//! drives the real `stasis` binary, with the real CRIU that `scripts/setup` installs.
#![allow(dead_code)]

/// Tests that need soft-dirty tracking: here, or in the test VM (scripts/vm).
pub mod vm;

use nix::sys::signal::Signal;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_stasis");
/// The namespace init program, built beside it.
pub const INIT_BIN: &str = env!("CARGO_BIN_EXE_stasis-init");
pub const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// Generous: the machine is noisy. Used only to give up waiting, never to judge speed.
pub const WAIT: Duration = Duration::from_secs(60);

/// Fails the test (never skips) when the host cannot run real checkpoints.
pub fn require_host() {
    assert!(nix::unistd::geteuid().is_root(), "integration tests need root (CRIU does); run scripts/test as root");
    let criu = which::which_in("criu", Some("/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin"), "/")
        .expect("CRIU is missing: run scripts/setup (scripts/test does) to build and install it");
    let out = Command::new(&criu).arg("--version").output().expect("run criu --version");
    assert!(out.status.success(), "criu --version failed");
}

pub struct Env {
    pub dir: tempfile::TempDir,
    started: std::cell::RefCell<Vec<String>>,
    criu_configs: std::cell::RefCell<Option<PathBuf>>,
}

impl Env {
    pub fn new() -> Env {
        require_host();
        let dir = tempfile::Builder::new().prefix("stasis-test-").tempdir().expect("tempdir");
        // The service user must reach files the tests put here (working dirs, scripts).
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(dir.path().join("conf")).unwrap();
        Env { dir, started: Default::default(), criu_configs: Default::default() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    pub fn service_dir(&self, name: &str) -> PathBuf {
        self.state_dir().join("services").join(name)
    }

    pub fn write_service(&self, name: &str, yaml: &str) -> PathBuf {
        let p = self.path().join("conf").join(format!("{name}.yaml"));
        std::fs::write(&p, yaml).unwrap();
        p
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_with(Path::new(BIN), args)
    }

    /// The same, with another stasis binary.
    pub fn cmd_with(&self, bin: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(bin);
        c.env("STASIS_CONFIG_DIR", self.path().join("conf"))
            .env("STASIS_STATE_DIR", self.state_dir())
            .env("STASIS_RUN_DIR", self.path().join("run"))
            .env(
                "STASIS_CRIU_CONFIG_DIR",
                self.criu_configs.borrow().clone().unwrap_or_else(|| Path::new(REPO).join("criu-configs")),
            )
            // Never the host's /etc/stasis/stasis.yaml: a test's own (usually absent) file.
            .env("STASIS_HOST_CONFIG", self.path().join("stasis.yaml"))
            .args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        logged(args, self.cmd(args))
    }

    /// Runs stasis and asserts the exit code; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.expect_code(args, 0)
    }

    pub fn expect_code(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(code), "stasis {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Every later command uses this CRIU config dir instead of the repository's.
    pub fn use_criu_configs(&self, dir: &Path) {
        *self.criu_configs.borrow_mut() = Some(dir.to_path_buf());
    }

    /// Makes the harness clean up after `name` at the end, as it does for `start`.
    pub fn adopt(&self, name: &str) {
        self.started.borrow_mut().push(name.to_string());
    }

    pub fn start(&self, name: &str) -> serde_json::Value {
        self.adopt(name);
        let out = self.ok(&["start", name, "--json"]);
        serde_json::from_str(&out).expect("start --json prints JSON")
    }

    pub fn status(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", name, "--json"])).expect("status --json prints JSON")
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.service_dir(name).join("service.log")).unwrap_or_default()
    }

    pub fn checkpoint_dirs(&self, name: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.service_dir(name).join("checkpoints"))
            .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for Env {
    /// Leaves no service behind, whatever the test did: SIGKILL each supervisor's service tree,
    /// and drop the nftables network locks of checkpoints that will never be restored.
    fn drop(&mut self) {
        release_criu_tables(&self.state_dir());
        let state_dir = self.state_dir().display().to_string();
        for name in self.started.borrow().iter() {
            // The supervisor first: one that restarts its service (`restart:`) could otherwise
            // start a new tree after the old one is killed. Then the status it left names the
            // tree's init. Only processes that are provably this test's: pids get reused.
            for (key, marker) in [("supervisor_pid", "__supervise"), ("init_pid", "__ns-init")] {
                let status = std::fs::read_to_string(self.service_dir(name).join("status.json")).unwrap_or_default();
                let v: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
                let Some(pid) = pid_in(&v[key]) else { continue };
                signal_if_ours(pid, &[marker, &state_dir], Signal::SIGKILL);
            }
        }
    }
}

/// Drops the nftables network locks (`inet CRIU-<run id>`) of every dump whose log is under
/// `dir`: checkpoints a test leaves unrestored would otherwise hold them on the host for good.
pub fn release_criu_tables(dir: &Path) {
    let Ok(out) = Command::new("grep").arg("-rhoa").arg("CRIU run id = [0-9a-f-]*").arg(dir).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let id: String = line.trim_start_matches("CRIU run id = ").chars().take(21).collect();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &format!("CRIU-{id}")])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Runs a prepared stasis command and prints what it did (shown when a test fails).
pub fn logged(args: &[&str], mut cmd: Command) -> Output {
    let out = cmd.output().expect("run stasis");
    eprintln!(
        "$ stasis {}\n  exit {:?}\n  stdout: {}\n  stderr: {}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// Waits until `f` returns Some, or panics after WAIT with `what`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal HTTP/1.0 request; returns the body.
pub fn http(port: u16, method: &str, path: &str, body: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(s, "{method} {path} HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}", body.len()).ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

pub fn http_json(port: u16) -> Option<serde_json::Value> {
    serde_json::from_str(&http(port, "GET", "/", "")?).ok()
}

/// Connects to a kill port the way `telnet` would; returns every line the supervisor sent.
pub fn kill_port(port: u16) -> Vec<String> {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the kill port");
    BufReader::new(s).lines().map(|l| l.expect("read kill port")).collect()
}

/// Real uid of a process.
pub fn uid_of(pid: i64) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process exists");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

pub fn uid_of_user(name: &str) -> u32 {
    nix::unistd::User::from_name(name).unwrap().expect("user exists").uid.as_raw()
}

/// The notes example service with its own ports.
pub fn notes_yaml(kill_port: u16, http_port: u16, extra: &str) -> String {
    format!(
        "command: [\"/usr/bin/python3\", \"{REPO}/examples/notes/notes.py\"]\nuser: stasis-example\nkill_port: {kill_port}\nenvironment:\n  NOTES_PORT: \"{http_port}\"\n  HEARTBEAT_SECS: \"0.05\"\n{extra}"
    )
}

/// Heartbeat numbers in the log, in order.
pub fn heartbeats(log: &str) -> Vec<u64> {
    log.lines().filter_map(|l| l.strip_prefix("heartbeat ")).filter_map(|n| n.trim().parse().ok()).collect()
}

/// Signals `pid` only if its command line contains every marker, through a pidfd taken
/// before the check: a pid reused in between can never be hit. Returns whether it was sent.
pub fn signal_if_ours(pid: i32, markers: &[&str], sig: Signal) -> bool {
    // SAFETY: pidfd_open has no memory arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let ours = markers.iter().all(|m| cmdline.contains(m));
    // SAFETY: signals the process the pidfd refers to; the pidfd is ours and closed after.
    let sent = ours
        && unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd, sig as i32, std::ptr::null::<libc::siginfo_t>(), 0)
        } == 0;
    // SAFETY: closing the pidfd opened above.
    unsafe { libc::close(fd) };
    sent
}

/// Sends `sig` to `pid`, which must be ours (see `signal_if_ours`); fails the test otherwise.
pub fn verified_signal(pid: i32, markers: &[&str], sig: Signal) {
    assert!(signal_if_ours(pid, markers, sig), "pid {pid} is not ours ({markers:?}) or could not be signalled");
}

pub fn verified_kill(pid: i32, markers: &[&str]) {
    verified_signal(pid, markers, Signal::SIGKILL);
}

/// A pid from status JSON (the supervisor's is a string, the init's a number).
pub fn pid_in(v: &serde_json::Value) -> Option<i32> {
    v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).map(|p| p as i32)
}

/// Gone or a zombie (nobody may reap an orphan at once).
pub fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            stat.rsplit_once(')').is_some_and(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X')))
        }
    }
}

/// `redis-cli -p PORT ARGS...`: its output, trimmed, when it succeeded.
pub fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `n` distinct loopback ports that were free a moment ago (bound to port 0 together, then
/// released): tests never depend on fixed ports that the examples or another program may hold.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> =
        (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port")).collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// Runs a Python snippet as `user` (setpriv: a real other uid); returns its stdout.
pub fn python_as(user: &str, code: &str) -> String {
    let out = Command::new("setpriv")
        .args(["--reuid", user, "--regid", "nogroup", "--clear-groups", "/usr/bin/python3", "-c", code])
        .output()
        .expect("setpriv python3");
    assert!(out.status.success(), "python as {user}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many committed checkpoints `name` has (a draft is a `.incomplete-` directory).
pub fn committed_checkpoints(env: &Env, name: &str) -> usize {
    env.checkpoint_dirs(name).iter().filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.')).count()
}

/// A fresh 32-byte encryption key file `NAME.key` of root's (0600) under the test's directory.
pub fn key_file(env: &Env, name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = env.path().join("keys");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join(format!("{name}.key"));
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
    std::fs::write(&key, bytes).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    key
}
