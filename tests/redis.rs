//! redis-server from Debian, persistence off: its keys live only in memory, so keys that
//! survive stop -> start survived in the checkpoint. Also the legacy shape: `--daemonize yes`.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn load_keys(port: u16, n: usize) {
    let mut child = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli (from redis-tools)");
    let mut stdin = child.stdin.take().unwrap();
    for i in 0..n {
        let (k, v) = (format!("key:{i}"), format!("value-{i}"));
        write!(stdin, "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n", k.len(), v.len()).unwrap();
    }
    drop(stdin);
    assert!(child.wait_with_output().unwrap().status.success());
}

fn wait_ping(port: u16) {
    wait_for("redis to answer PING", || redis_cli(port, &["PING"]).filter(|r| r == "PONG"));
}

fn cycle(env: &Env, name: &str, port: u16, keys: usize) {
    let first = env.start(name);
    assert_eq!(first["started_from"], "cold");
    wait_ping(port);
    load_keys(port, keys);
    assert_eq!(redis_cli(port, &["DBSIZE"]).unwrap(), keys.to_string());
    let pid = env.status(name)["pid"].as_i64().unwrap();
    assert_eq!(uid_of(pid), uid_of_user("redis"), "redis runs as user redis");

    let out = env.ok(&["stop", name]);
    assert!(out.lines().last().unwrap().starts_with("OK checkpoint"), "{out}");
    assert!(redis_cli(port, &["PING"]).is_none(), "redis is gone after stop");

    let again = env.start(name);
    assert_eq!(again["started_from"], "checkpoint");
    wait_ping(port);
    assert_eq!(redis_cli(port, &["DBSIZE"]).unwrap(), keys.to_string(), "every key survived");
    assert_eq!(redis_cli(port, &["GET", "key:1234"]).unwrap(), "value-1234");
    let pid = env.status(name)["pid"].as_i64().unwrap();
    assert_eq!(uid_of(pid), uid_of_user("redis"), "restored redis runs as user redis");
    env.ok(&["stop", name]);
}

#[test]
fn redis_keeps_10000_keys_across_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service(
        "redis",
        &format!("command: [\"/usr/bin/redis-server\", \"--port\", \"{port}\", \"--bind\", \"127.0.0.1\", \"--save\", \"\", \"--appendonly\", \"no\"]\nuser: redis\nkill_port: {kill}\n"),
    );
    cycle(&env, "redis", port, 10_000);
}

#[test]
fn daemonizing_redis_works_the_same_way() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let dir = env.path().join("redis-d");
    std::fs::create_dir(&dir).unwrap();
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(uid_of_user("redis"))), None).unwrap();
    env.write_service(
        "redisd",
        &format!(
            "command: [\"/usr/bin/redis-server\", \"--port\", \"{port}\", \"--bind\", \"127.0.0.1\", \"--save\", \"\", \"--appendonly\", \"no\", \"--daemonize\", \"yes\", \"--pidfile\", \"{d}/redis.pid\", \"--logfile\", \"{d}/redis.log\"]\nuser: redis\nkill_port: {kill}\nworking_dir: {d}\n",
            d = dir.display()
        ),
    );
    cycle(&env, "redisd", port, 2_000);
}

/// A client that connects while redis is frozen (here: stopped with SIGSTOP, as a slow dump
/// would leave it) leaves a connection nobody has accepted; the stop still works
/// (`skip-in-flight` in the default CRIU options) and the client can reconnect afterwards.
#[test]
fn a_connection_made_during_the_freeze_does_not_fail_the_stop() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service(
        "inflight",
        &format!("command: [\"/usr/bin/redis-server\", \"--port\", \"{port}\", \"--bind\", \"127.0.0.1\", \"--save\", \"\", \"--appendonly\", \"no\"]\nuser: redis\nkill_port: {kill}\n"),
    );
    env.start("inflight");
    wait_ping(port);
    redis_cli(port, &["SET", "k", "v"]).unwrap();
    let pid = env.status("inflight")["pid"].as_i64().unwrap() as i32;
    let freeze = |sig| verified_signal(pid, &["redis-server", &format!(":{port}")], sig);
    freeze(nix::sys::signal::Signal::SIGSTOP);
    let pending = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the kernel completes the handshake");
    let out = env.run(&["stop", "inflight"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    drop(pending);
    env.start("inflight");
    let pid = env.status("inflight")["pid"].as_i64().unwrap() as i32;
    // CRIU restores the task as it was: stopped. Let it go on.
    verified_signal(pid, &["redis-server", &format!(":{port}")], nix::sys::signal::Signal::SIGCONT);
    wait_ping(port);
    assert_eq!(redis_cli(port, &["GET", "k"]).as_deref(), Some("v"));
    env.ok(&["stop", "inflight"]);
}
