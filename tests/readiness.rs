//! `ready:`: `start` returns once the service answers (tcp), a check command passes (exec) or
//! the service sends READY=1 (notify), and a service that never gets ready fails the start
//! with the reason and its last output. Every port is picked free at run time.

mod common;
use common::*;

#[test]
fn start_waits_for_a_tcp_port() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    // The notes service, two seconds slow to come up.
    let yaml = notes_yaml(kill, http_port, &format!("ready:\n  tcp: \"127.0.0.1:{http_port}\"\n")).replacen(
        "command: [\"/usr/bin/python3\", \"",
        "command: [\"/bin/sh\", \"-c\", \"sleep 2; exec /usr/bin/python3 \\\"$0\\\"\", \"",
        1,
    );
    env.write_service("slow", &yaml);
    env.start("slow");
    assert!(http_json(http_port).is_some(), "the service answers as soon as start returns");
    env.ok(&["stop", "slow"]);
}

#[test]
fn start_waits_for_a_check_command() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let flag = env.path().join("flags/ready");
    std::fs::create_dir(env.path().join("flags")).unwrap();
    nix::unistd::chown(
        &env.path().join("flags"),
        Some(nix::unistd::Uid::from_raw(uid_of_user("stasis-example"))),
        None,
    )
    .unwrap();
    env.write_service(
        "flagged",
        &format!(
            "command: [\"/bin/sh\", \"-c\", \"sleep 1.5; touch {f}; exec sleep 600\"]\nuser: stasis-example\nkill_port: {kill}\nready:\n  exec: [\"/usr/bin/test\", \"-e\", \"{f}\"]\n",
            f = flag.display()
        ),
    );
    env.start("flagged");
    assert!(flag.exists(), "start returned only after the check passed");
    env.ok(&["stop", "flagged"]);
}

#[test]
fn a_service_that_never_gets_ready_fails_the_start() {
    let env = Env::new();
    // Nothing listens on `idle`.
    let [kill, idle, kill_bad] = free_ports::<3>();
    env.write_service(
        "never",
        &format!("command: [\"/bin/sh\", \"-c\", \"echo listening-soon; exec sleep 600\"]\nuser: stasis-example\nkill_port: {kill}\nready:\n  tcp: \"127.0.0.1:{idle}\"\nready_timeout: 2s\n"),
    );
    let out = env.run(&["start", "never"]);
    assert_eq!(out.status.code(), Some(6), "not ready in time: a failed start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ready_timeout (2s)") && err.contains(&format!("127.0.0.1:{idle}")), "{err}");
    assert!(err.contains("listening-soon"), "its last output is shown: {err}");
    let st = env.status("never");
    assert_eq!(st["state"], "failed", "{st}");
    let bad = env.write_service(
        "badready",
        &format!("command: [\"/bin/true\"]\nuser: nobody\nkill_port: {kill_bad}\nready: sometimes\n"),
    );
    let out = env.run(&["validate", &bad.display().to_string()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("key `ready`"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// A service that says READY=1 to $NOTIFY_SOCKET the way sd_notify does, after `delay` seconds,
/// touching `flag` just before.
fn notifier_yaml(kill_port: u16, flag: &std::path::Path, extra: &str) -> String {
    let script = format!(
        "import os, socket, time\\ntime.sleep(1.5)\\nopen('{f}', 'w').close()\\na = os.environ['NOTIFY_SOCKET']\\na = chr(0) + a[1:] if a.startswith('@') else a\\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\\ns.sendto(b'STATUS=warm\\\\nREADY=1', a)\\nprint('notified', flush=True)\\ntime.sleep(600)\\n",
        f = flag.display()
    );
    format!(
        "command: [\"/usr/bin/python3\", \"-c\", \"{script}\"]\nuser: stasis-example\nkill_port: {kill_port}\nready: notify\n{extra}"
    )
}

fn flags_dir(env: &Env) -> std::path::PathBuf {
    let dir = env.path().join("flags");
    std::fs::create_dir_all(&dir).unwrap();
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(uid_of_user("stasis-example"))), None).unwrap();
    dir
}

#[test]
fn start_waits_for_ready_1_from_the_service_and_a_restore_does_not_wait_again() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let flag = flags_dir(&env).join("notified");
    env.write_service("notifier", &notifier_yaml(kill, &flag, "ready_timeout: 20s\n"));
    let started = env.start("notifier");
    assert_eq!(started["started_from"], "cold", "{started}");
    assert!(flag.exists(), "start returned only after the service sent READY=1");
    let pid = pid_in(&started["pid"]).expect("a pid");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let socket = environ.split(|b| *b == 0).find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET=")).map(|v| v.to_vec());
    let socket = String::from_utf8(socket.expect("the service has NOTIFY_SOCKET")).unwrap();
    assert!(socket.starts_with("@stasis/notifier/notify/"), "{socket}");
    env.ok(&["stop", "notifier"]);
    // Restored: it does not notify again, and start must not wait for it to (5 s would fail).
    env.write_service("notifier", &notifier_yaml(kill, &flag, "ready_timeout: 5s\n"));
    let restored = env.start("notifier");
    assert_eq!(restored["started_from"], "checkpoint", "{restored}");
    env.ok(&["stop", "notifier"]);
}

#[test]
fn ready_1_from_outside_the_service_is_ignored() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    env.write_service(
        "silent",
        &format!("command: [\"/bin/sh\", \"-c\", \"echo never-notifies; exec sleep 600\"]\nuser: stasis-example\nkill_port: {kill}\nready: notify\nready_timeout: 4s\n"),
    );
    let start = env
        .cmd(&["start", "silent"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The supervisor's abstract socket, as the kernel lists it; then READY=1 from this process,
    // which is not in the service's tree.
    let name = wait_for("the notify socket", || {
        std::fs::read_to_string("/proc/net/unix").ok()?.lines().find_map(|l| {
            l.split_whitespace().last().filter(|p| p.starts_with("@stasis/silent/notify/")).map(str::to_string)
        })
    });
    let sent = std::process::Command::new("python3")
        .args(["-c", "import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b'READY=1', b'\\0' + sys.argv[1].encode()[1:])", &name])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = start.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "READY=1 from a stranger does not make it ready: {err}");
    assert!(err.contains("sent no READY=1") && err.contains("which is not a process of the service"), "{err}");
    assert!(err.contains("never-notifies"), "its last output is shown: {err}");
    assert_eq!(env.status("silent")["state"], "failed");
}

#[test]
fn a_notify_service_that_dies_before_it_is_ready_fails_the_start_at_once() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    env.write_service(
        "quitter",
        &format!("command: [\"/bin/sh\", \"-c\", \"echo giving-up; exit 3\"]\nuser: stasis-example\nkill_port: {kill}\nready: notify\nready_timeout: 10m\n"),
    );
    // With a 10 minute ready_timeout, only noticing the exit ends this start.
    let out = env.run(&["start", "quitter"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("exited before it was ready") && err.contains("giving-up"), "{err}");
}
