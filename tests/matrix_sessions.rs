//! Compatibility matrix, sessions: programs whose clients hold a connection or a session open
//! across `stasis stop` + `stasis start`, with the plain service file (the defaults in
//! criu-configs/: tcp-established and the nftables network lock).
//!
//! Every port is picked free at run time.
//! Needs: python3, openssh-server + openssh-client, tmux, `script` (bsdutils); the user
//! `stasis-ssh` (see SSH_USER). sshd as root needs /run/sshd: created here if missing, removed after.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// One line-protocol client that keeps its socket for the whole test.
struct LineClient {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl LineClient {
    fn connect(port: u16) -> Option<LineClient> {
        let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        Some(LineClient { reader: BufReader::new(s.try_clone().ok()?), writer: s })
    }

    fn send(&mut self, line: &str) {
        self.writer.write_all(format!("{line}\n").as_bytes()).expect("send a line on the kept connection");
    }

    fn recv(&mut self) -> String {
        let mut l = String::new();
        let n = self.reader.read_line(&mut l).expect("read a reply on the kept connection");
        assert!(n > 0, "the server closed the connection");
        l.trim_end().to_string()
    }

    fn ask(&mut self, line: &str) -> String {
        self.send(line);
        self.recv()
    }

    fn local_port(&self) -> u16 {
        self.writer.local_addr().unwrap().port()
    }
}

fn asyncio_yaml(kill_port: u16, port: u16) -> String {
    format!(
        "command: [\"/usr/bin/python3\", \"{REPO}/tests/programs/asyncio_counter.py\"]\nuser: stasis-example\nkill_port: {kill_port}\nenvironment:\n  ASYNCIO_PORT: \"{port}\"\n"
    )
}

#[test]
fn asyncio_server_keeps_its_established_client_connections_and_their_state() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("aio", &asyncio_yaml(kill, port));
    let first = env.start("aio");
    assert_eq!(first["started_from"], "cold", "{first}");
    let mut a = wait_for("the asyncio server", || LineClient::connect(port));
    // Each answers once, so the server has accepted both before the counts are checked.
    assert_eq!(a.ask("state"), "conn=1 lines=0 sum=0 total=0 conns=1");
    let mut b = LineClient::connect(port).expect("a second client");
    assert_eq!(b.ask("state"), "conn=2 lines=0 sum=0 total=0 conns=2");
    assert_eq!(a.ask("add 5"), "conn=1 lines=1 sum=5 total=5 conns=2");
    assert_eq!(b.ask("add 7"), "conn=2 lines=1 sum=7 total=12 conns=2");
    assert_eq!(a.ask("add 1"), "conn=1 lines=2 sum=6 total=13 conns=2");
    let (port_a, port_b) = (a.local_port(), b.local_port());

    let t = Instant::now();
    env.ok(&["stop", "aio"]);
    let stopped = t.elapsed();
    let t = Instant::now();
    let back = env.start("aio");
    let started = t.elapsed();
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    eprintln!("stop {stopped:?}, start {started:?}");

    // The same sockets (not reconnected) go on, and the server still knows them.
    assert_eq!((a.local_port(), b.local_port()), (port_a, port_b));
    let t = Instant::now();
    assert_eq!(b.ask("add 10"), "conn=2 lines=2 sum=17 total=23 conns=2", "b's connection and the total continue");
    eprintln!("first reply after the restore {:?}", t.elapsed());
    assert_eq!(a.ask("state"), "conn=1 lines=2 sum=6 total=23 conns=2", "a's connection continues");
    // A new client is the third the server ever accepted: its counter came back too.
    let mut c = LineClient::connect(port).expect("a new client after the restore");
    assert_eq!(c.ask("add 2"), "conn=3 lines=1 sum=2 total=25 conns=3");
    drop(c);

    // A second cycle, with a line sent while the service is stopped: the network lock holds
    // it (no reset), TCP retransmits it and the restored server answers.
    env.ok(&["stop", "aio"]);
    a.send("add 100");
    let back = env.start("aio");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    let t = Instant::now();
    assert_eq!(a.recv(), "conn=1 lines=3 sum=106 total=125 conns=2", "the line sent during the stop arrived once");
    eprintln!("reply to the line sent while stopped: {:?} after the start", t.elapsed());
    assert_eq!(b.ask("state"), "conn=2 lines=2 sum=17 total=125 conns=2");
    env.ok(&["stop", "aio"]);
}

/// A client process this test spawned, killed through its handle if the test ends early.
struct Spawned(std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Lines a child process writes, read by a thread so a test can wait for one with a deadline.
struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn of(out: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { rx, seen: Vec::new() }
    }

    /// The first next line that starts with `prefix`; fails the test after WAIT.
    fn expect(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if let Some(i) = l.find(prefix) {
                        return l[i..].trim_end().to_string();
                    }
                }
                Err(e) => panic!("no line starting with {prefix:?} ({e}); seen so far: {:#?}", self.seen),
            }
        }
    }
}

/// sshd's privilege separation directory, compiled into OpenSSH (/run/sshd): sshd running as
/// root refuses to start without it. Normally ssh.service creates it (RuntimeDirectory); this
/// machine runs no systemd. Created for the test if missing and removed after, even on panic.
struct PrivsepDir {
    created: bool,
}

impl PrivsepDir {
    const PATH: &'static str = "/run/sshd";

    fn ensure() -> PrivsepDir {
        let created = match std::fs::create_dir(Self::PATH) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => panic!("create {}: {e}", Self::PATH),
        };
        if created {
            std::fs::set_permissions(Self::PATH, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        PrivsepDir { created }
    }
}

impl Drop for PrivsepDir {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_dir(Self::PATH);
        }
    }
}

/// A private sshd setup in `dir`: host key, client key, authorized_keys, sshd_config; the host
/// key owned by `owner` (sshd's user) when given. Returns the client key's path.
/// sshd as the service `name`, run as `user` (files owned by `owner`), cold-started and
/// listening on `port`; returns the client key.
fn start_sshd(env: &Env, name: &str, user: &str, owner: Option<u32>, port: u16, kill_port: u16) -> std::path::PathBuf {
    let dir = env.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    let key = sshd_files(&dir, port, owner);
    env.write_service(
        name,
        &format!(
            // sshd run as root (to switch to the logged-in user) says so: root needs allow_root.
            "command: [\"/usr/sbin/sshd\", \"-D\", \"-e\", \"-f\", \"{}/sshd_config\"]\nuser: {user}\nkill_port: {kill_port}\n{}",
            dir.display(),
            if user == "root" { "allow_root: true\n" } else { "" }
        ),
    );
    let first = env.start(name);
    assert_eq!(first["started_from"], "cold", "{first}");
    wait_for("sshd to listen", || TcpStream::connect(("127.0.0.1", port)).ok());
    key
}

fn sshd_files(dir: &std::path::Path, port: u16, owner: Option<u32>) -> std::path::PathBuf {
    for key in ["host_key", "client_key"] {
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "stasis-test", "-f"])
            .arg(dir.join(key))
            .status()
            .expect("run ssh-keygen");
        assert!(st.success(), "ssh-keygen {key}");
    }
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
    if let Some(uid) = owner {
        nix::unistd::chown(&dir.join("host_key"), Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
    }
    let d = dir.display();
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nPrintMotd no\nPrintLastLog no\n"
        ),
    )
    .unwrap();
    dir.join("client_key")
}

/// `ssh` to the test's sshd, never touching ~/.ssh (no user config, no known_hosts, no agent).
fn ssh(key: &std::path::Path, port: u16, user: &str) -> std::process::Command {
    let mut c = std::process::Command::new("ssh");
    c.args(["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i"])
        .arg(key)
        .args(["-p", &port.to_string(), &format!("{user}@127.0.0.1")]);
    c
}

#[test]
fn sshd_keeps_an_open_session_across_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let _privsep = PrivsepDir::ensure();
    let key = start_sshd(&env, "sshd", "root", None, port, kill);

    // One session: a shell reading commands from the client's stdin.
    let mut client = Spawned(
        ssh(&key, port, "root")
            .arg("exec /bin/bash")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run ssh"),
    );
    let mut to_shell = client.0.stdin.take().unwrap();
    let mut from_shell = Lines::of(client.0.stdout.take().unwrap());
    writeln!(to_shell, "KEPT=set-before-stop; echo \"one:$$:$KEPT\"").unwrap();
    let one = from_shell.expect("one:");
    let shell_pid = one.split(':').nth(1).unwrap().to_string();
    assert_eq!(one, format!("one:{shell_pid}:set-before-stop"));

    let t = Instant::now();
    env.ok(&["stop", "sshd"]);
    let stopped = t.elapsed();
    let t = Instant::now();
    let back = env.start("sshd");
    let started = t.elapsed();
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    eprintln!("stop {stopped:?}, start {started:?}");

    // The same session, the same shell (its pid and a variable set before the stop).
    let t = Instant::now();
    writeln!(to_shell, "echo \"two:$$:$KEPT:$((6*7))\"").unwrap();
    assert_eq!(from_shell.expect("two:"), format!("two:{shell_pid}:set-before-stop:42"));
    eprintln!("first answer after the restore {:?}", t.elapsed());
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "sshd", "--json"])).unwrap();
    let comms: Vec<&str> = v["processes"].as_array().unwrap().iter().filter_map(|p| p["comm"].as_str()).collect();
    assert!(comms.contains(&"bash") && comms.iter().filter(|c| **c == "sshd").count() >= 2, "{comms:?}");

    // The restored listener takes new sessions too.
    let fresh = ssh(&key, port, "root").arg("echo fresh:$((2+3))").output().expect("run ssh");
    assert_eq!(String::from_utf8_lossy(&fresh.stdout).trim(), "fresh:5", "{}", String::from_utf8_lossy(&fresh.stderr));

    // A second cycle, with a command typed while sshd is stopped: the network lock holds the
    // packets, TCP retransmits them to the restored sshd and the shell runs the command once.
    env.ok(&["stop", "sshd"]);
    writeln!(to_shell, "KEPT=$KEPT+typed-while-stopped; echo \"three:$$:$KEPT\"").unwrap();
    let back = env.start("sshd");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    assert_eq!(from_shell.expect("three:"), format!("three:{shell_pid}:set-before-stop+typed-while-stopped"));

    // The kept session ends cleanly: the shell's exit status reaches the client.
    writeln!(to_shell, "exit 7").unwrap();
    drop(to_shell);
    let status = client.0.wait().expect("wait for ssh");
    assert_eq!(status.code(), Some(7), "the session's shell exited through the restored sshd");
    env.ok(&["stop", "sshd"]);
}

/// A tmux client on the test's server socket. Only commands that never start a server of their
/// own are used after the first `new-session` (which runs once the service's server answers).
fn tmux(sock: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("tmux").env_remove("TMUX").arg("-S").arg(sock).args(args).output().expect("run tmux")
}

fn tmux_ok(sock: &std::path::Path, args: &[&str]) -> String {
    let out = tmux(sock, args);
    assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

/// The pane's visible text once it has a line starting with `prefix`; that line.
fn pane_line(sock: &std::path::Path, prefix: &str) -> String {
    wait_for(&format!("a line {prefix:?} in the pane"), || {
        let screen = tmux_ok(sock, &["capture-pane", "-p", "-t", "work:edit"]);
        screen.lines().find(|l| l.starts_with(prefix)).map(str::to_string)
    })
}

/// A tmux server as the service NAME (`tmux -D`, as stasis-example), with a session `work` whose
/// window `edit` runs a shell that has set KEPT and printed `one:PID:before-stop:42`.
/// Returns the server's socket and that line.
fn tmux_service_with_a_session(env: &Env, name: &str, kill_port: u16) -> (std::path::PathBuf, String) {
    let dir = env.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(uid_of_user("stasis-example"))), None).unwrap();
    // The service user's login shell is nologin, and tmux's default-shell is the server's
    // $SHELL: without this every pane exits at once and tmux destroys the session with it.
    std::fs::write(dir.join("tmux.conf"), "set -g default-shell /bin/bash\n").unwrap();
    let sock = dir.join("sock");
    env.write_service(
        name,
        &format!(
            "command: [\"/usr/bin/tmux\", \"-D\", \"-f\", \"{d}/tmux.conf\", \"-S\", \"{d}/sock\"]\nuser: stasis-example\nworking_dir: {d}\nkill_port: {kill_port}\n",
            d = dir.display()
        ),
    );
    let first = env.start(name);
    assert_eq!(first["started_from"], "cold", "{first}");
    // The service's server answers before any client may start a server of its own.
    wait_for("the tmux server's socket", || std::os::unix::net::UnixStream::connect(&sock).ok());
    tmux_ok(&sock, &["new-session", "-d", "-s", "work", "-n", "edit", "-x", "200", "-y", "30"]);
    tmux_ok(&sock, &["send-keys", "-t", "work:edit", "KEPT=before-stop; echo \"one:$$:$KEPT:$((6*7))\"", "Enter"]);
    let one = pane_line(&sock, "one:");
    (sock, one)
}

#[test]
fn tmux_keeps_its_session_window_and_shell_across_stop_and_start() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let (sock, one) = tmux_service_with_a_session(&env, "tmux", kill);
    let shell_pid = tmux_ok(&sock, &["display-message", "-p", "-t", "work:edit", "#{pane_pid}"]);
    assert_eq!(one, format!("one:{shell_pid}:before-stop:42"), "the pane's shell answered");

    let t = Instant::now();
    env.ok(&["stop", "tmux"]);
    let stopped = t.elapsed();
    assert!(!tmux(&sock, &["has-session", "-t", "work"]).status.success(), "no server while stopped");
    let t = Instant::now();
    let back = env.start("tmux");
    let started = t.elapsed();
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    eprintln!("stop {stopped:?}, start {started:?}");

    // The session, its window and the screen's text came back; the same shell goes on.
    tmux_ok(&sock, &["has-session", "-t", "work"]);
    assert_eq!(tmux_ok(&sock, &["list-windows", "-t", "work", "-F", "#{window_name}"]), "edit");
    assert_eq!(pane_line(&sock, "one:"), one, "the text typed before the stop is on the screen");
    assert_eq!(tmux_ok(&sock, &["display-message", "-p", "-t", "work:edit", "#{pane_pid}"]), shell_pid);
    tmux_ok(&sock, &["send-keys", "-t", "work:edit", "echo \"two:$$:$KEPT:$((6*7))\"", "Enter"]);
    assert_eq!(
        pane_line(&sock, "two:"),
        format!("two:{shell_pid}:before-stop:42"),
        "the same shell, its variable kept"
    );
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "tmux", "--json"])).unwrap();
    let comms: Vec<&str> = v["processes"].as_array().unwrap().iter().filter_map(|p| p["comm"].as_str()).collect();
    assert!(comms.contains(&"tmux: server") && comms.contains(&"bash"), "{comms:?}");
    env.ok(&["stop", "tmux"]);
}

/// Known limit, pinned: a client attached to the tmux server is a process outside the service
/// holding one end of a unix stream connection; CRIU cannot checkpoint half of one (not even
/// with --ext-unix-sk: "Ext stream not supported"). The stop refuses and the service, session
/// and client keep running; once the client detaches, stop and start work.
#[test]
fn tmux_with_an_attached_client_refuses_the_stop_and_keeps_running_until_it_detaches() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let (sock, one) = tmux_service_with_a_session(&env, "tmux-attached", kill);
    // An attached client needs a terminal: `script` gives it one.
    let mut attached = Spawned(
        std::process::Command::new("script")
            .args(["-qfc", &format!("tmux -S {} attach -t work", sock.display()), "/dev/null"])
            .env("TERM", "xterm")
            .env_remove("TMUX")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run script"),
    );
    wait_for("the attached client", || {
        Some(()).filter(|_| tmux_ok(&sock, &["list-clients", "-t", "work"]).lines().count() == 1)
    });
    let pid = env.status("tmux-attached")["pid"].clone();

    let out = env.run(&["stop", "tmux-attached"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "the dump fails: {err}");
    assert!(err.contains("unix stream socket") && err.contains("disconnect"), "names the cause and the fix: {err}");
    // The client is named by its pid and command, and the way to stop anyway is said.
    let client_pid = tmux_ok(&sock, &["list-clients", "-t", "work", "-F", "#{client_pid}"]).trim().to_string();
    assert!(!client_pid.is_empty(), "tmux names its client's pid");
    assert!(err.contains(&format!("pid {client_pid}")) && err.contains("tmux"), "names the client process: {err}");
    assert!(err.contains("--no-checkpoint"), "says how to stop anyway: {err}");
    assert!(!err.contains("add --ext-unix-sk"), "an option that cannot help is not offered: {err}");
    assert_eq!(env.status("tmux-attached")["pid"], pid, "the service keeps running");
    tmux_ok(&sock, &["has-session", "-t", "work"]);
    assert_eq!(tmux_ok(&sock, &["list-clients", "-t", "work"]).lines().count(), 1, "the client is still attached");
    assert!(attached.0.try_wait().unwrap().is_none(), "the client was not disconnected");

    tmux_ok(&sock, &["detach-client", "-s", "work"]);
    let status = wait_for("the client to exit", || attached.0.try_wait().unwrap());
    assert!(status.success(), "{status}");
    env.ok(&["stop", "tmux-attached"]);
    let back = env.start("tmux-attached");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    assert_eq!(pane_line(&sock, "one:"), one, "the session came back");
    env.ok(&["stop", "tmux-attached"]);
}

/// The user the non-root sshd runs as, and the only one it can log in: a real shell, and a
/// member of `tty` (this machine's devpts has no gid=5, so sshd must chown the session's pty to
/// group tty itself, which only a member may do). `scripts/setup` creates it.
const SSH_USER: &str = "stasis-ssh";

/// An interactive session on a pty (`ssh -tt`), through an sshd running as an ordinary user:
/// the pty's master in sshd and the login shell on its slave are restored, and the same shell
/// goes on. (sshd as root would write this login to /var/log/wtmp and lastlog; as a user it
/// skips them: "Attempt to write login records by non-root user".)
#[test]
fn sshd_as_a_user_keeps_an_interactive_pty_session_across_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let user = nix::unistd::User::from_name(SSH_USER)
        .unwrap()
        .unwrap_or_else(|| panic!("user {SSH_USER} is missing: scripts/setup creates it (shell /bin/bash, group tty)"));
    let key = start_sshd(&env, "sshd-tty", SSH_USER, Some(user.uid.as_raw()), port, kill);

    let mut client = Spawned(
        ssh(&key, port, SSH_USER)
            .arg("-tt")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run ssh"),
    );
    let mut to_shell = client.0.stdin.take().unwrap();
    let mut from_shell = Lines::of(client.0.stdout.take().unwrap());
    // The terminal echoes what is typed: the answers are built so the typed text never matches.
    writeln!(to_shell, "KEPT=before-stop; printf '%s:%s:%s:%s\\n' ONE \"$$\" \"$KEPT\" \"$(tty)\"").unwrap();
    let one = from_shell.expect("ONE:");
    let fields: Vec<&str> = one.split(':').collect();
    assert_eq!(fields.len(), 4, "{one}");
    let (shell_pid, tty) = (fields[1].to_string(), fields[3].to_string());
    assert!(tty.starts_with("/dev/pts/"), "a login shell on a pty: {one}");
    assert_eq!(fields[2], "before-stop");

    let t = Instant::now();
    env.ok(&["stop", "sshd-tty"]);
    let stopped = t.elapsed();
    let t = Instant::now();
    let back = env.start("sshd-tty");
    let started = t.elapsed();
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    eprintln!("stop {stopped:?}, start {started:?}");

    writeln!(to_shell, "printf '%s:%s:%s:%s:%s\\n' TWO \"$$\" \"$KEPT\" \"$(tty)\" \"$((6*7))\"").unwrap();
    assert_eq!(
        from_shell.expect("TWO:"),
        format!("TWO:{shell_pid}:before-stop:{tty}:42"),
        "the same shell on the same pty"
    );
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "sshd-tty", "--json"])).unwrap();
    let comms: Vec<&str> = v["processes"].as_array().unwrap().iter().filter_map(|p| p["comm"].as_str()).collect();
    assert!(comms.contains(&"bash") && comms.iter().filter(|c| **c == "sshd").count() >= 2, "{comms:?}");

    writeln!(to_shell, "exit 3").unwrap();
    let status = client.0.wait().expect("wait for ssh");
    assert_eq!(status.code(), Some(3), "the login shell's exit status reached the client");
    env.ok(&["stop", "sshd-tty"]);
}
