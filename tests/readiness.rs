//! `ready:`: `start` returns once the service answers (tcp) or a check command passes (exec),
//! and a service that never gets ready fails the start with the reason and its last output.
//!
//! Ports: kill 7940-7942, http 8940-8942.

mod common;
use common::*;

#[test]
fn start_waits_for_a_tcp_port() {
    let env = Env::new();
    // The notes service, two seconds slow to come up.
    let yaml = notes_yaml(7940, 8940, "ready:\n  tcp: \"127.0.0.1:8940\"\n").replacen(
        "command: [\"/usr/bin/python3\", \"",
        "command: [\"/bin/sh\", \"-c\", \"sleep 2; exec /usr/bin/python3 \\\"$0\\\"\", \"",
        1,
    );
    env.write_service("slow", &yaml);
    env.start("slow");
    assert!(http_json(8940).is_some(), "the service answers as soon as start returns");
    env.ok(&["stop", "slow"]);
}

#[test]
fn start_waits_for_a_check_command() {
    let env = Env::new();
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
            "command: [\"/bin/sh\", \"-c\", \"sleep 1.5; touch {f}; exec sleep 600\"]\nuser: stasis-example\nkill_port: 7941\nready:\n  exec: [\"/usr/bin/test\", \"-e\", \"{f}\"]\n",
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
    env.write_service(
        "never",
        "command: [\"/bin/sh\", \"-c\", \"echo listening-soon; exec sleep 600\"]\nuser: stasis-example\nkill_port: 7942\nready:\n  tcp: \"127.0.0.1:8942\"\nready_timeout: 2s\n",
    );
    let out = env.run(&["start", "never"]);
    assert_eq!(out.status.code(), Some(6), "not ready in time: a failed start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ready_timeout (2s)") && err.contains("127.0.0.1:8942"), "{err}");
    assert!(err.contains("listening-soon"), "its last output is shown: {err}");
    let st = env.status("never");
    assert_eq!(st["state"], "failed", "{st}");
    let bad = env.write_service("badready", "command: [\"/bin/true\"]\nuser: nobody\nkill_port: 7943\nready: notify\n");
    let out = env.run(&["validate", &bad.display().to_string()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("key `ready`"), "{}", String::from_utf8_lossy(&out.stdout));
}
