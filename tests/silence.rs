//! A kill-port client that stays silent (telnet) asks for a stop after a few milliseconds, and
//! the stop is asked again at CRIU's `post-dump`, the last moment before the service ends: a
//! client that has sent anything but `stop` by then (a slow browser's HTTP request or TLS
//! hello) or has left calls it off. The service is resumed with its memory, and no checkpoint
//! is committed. Every port is picked free at run time.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

fn drafts(env: &Env, name: &str) -> Vec<std::path::PathBuf> {
    env.checkpoint_dirs(name)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".incomplete"))
        .collect()
}

fn notes(port: u16) -> Vec<String> {
    let v = http_json(port).expect("the notes service answers");
    v["notes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect()
}

/// `checkpoint_failures` in the service's counters (0 when none was ever counted).
fn checkpoint_failures(env: &Env, name: &str) -> u64 {
    let text = std::fs::read_to_string(env.service_dir(name).join("counters.json")).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text).unwrap_or_default()["checkpoint_failures"].as_u64().unwrap_or(0)
}

#[test]
fn a_silent_client_stops_the_service_with_a_checkpoint_as_root_and_as_the_service_user() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("quiet", &notes_yaml(kill, port, ""));
    env.start("quiet");
    wait_for("the service to answer", || http_json(port));
    http(port, "POST", "/notes", "kept in memory").expect("post a note");

    // As root: connect, send nothing, keep the connection open and read to its end.
    let lines = kill_port(kill);
    assert_eq!(lines.first().map(String::as_str), Some("Saving checkpoint of quiet and shutting down..."), "{lines:?}");
    assert!(lines.last().is_some_and(|l| l.starts_with("OK checkpoint")), "{lines:?}");
    assert_eq!(committed_checkpoints(&env, "quiet"), 1);
    assert_eq!(env.status("quiet")["state"], "stopped");

    let back = env.start("quiet");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    assert_eq!(notes(port), vec!["kept in memory".to_string()], "restored with its memory");

    // As the service user, the same silence.
    let code = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {kill}))\nprint(s.makefile().read(), end='')"
    );
    let reply = python_as("stasis-example", &code);
    assert!(reply.lines().last().is_some_and(|l| l.starts_with("OK checkpoint")), "{reply}");
    assert_eq!(committed_checkpoints(&env, "quiet"), 2);
    assert_eq!(env.status("quiet")["state"], "stopped");
    let back = env.start("quiet");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    assert_eq!(notes(port), vec!["kept in memory".to_string()]);
    assert_eq!(checkpoint_failures(&env, "quiet"), 0);
}

/// A service holding 256 MiB of random memory: its dump takes long enough (CRIU writes it all
/// before `post-dump`) that bytes sent the moment the client is admitted arrive well before.
fn big_service(env: &Env, name: &str) -> (u16, u16, String) {
    let [kill, port] = free_ports::<2>();
    env.write_service(
        name,
        &format!(
            "command: [\"/usr/bin/python3\", \"{REPO}/tests/programs/big_memory.py\"]\nuser: stasis-example\nkill_port: {kill}\nenvironment:\n  MIB: \"256\"\n  PORT: \"{port}\"\n"
        ),
    );
    env.start(name);
    let memory = wait_for("the service to answer", || http(port, "GET", "/", ""));
    (kill, port, memory)
}

/// Connects and waits, silent, for the announcement: the client was admitted for its silence
/// (it lasted the whole wait) and the stop's dump is on its way.
fn admitted_silent(kill: u16, name: &str) -> BufReader<TcpStream> {
    let mut reader = BufReader::new(TcpStream::connect(("127.0.0.1", kill)).expect("connect to the kill port"));
    let mut first = String::new();
    reader.read_line(&mut first).expect("read the announcement");
    assert_eq!(first, format!("Saving checkpoint of {name} and shutting down...\n"));
    reader
}

/// The service runs on with the same memory, and nothing was committed or left behind.
fn still_running_untouched(env: &Env, name: &str, port: u16, memory: &str) {
    wait_for("the service to be running again", || (env.status(name)["state"] == "running").then_some(()));
    let now = wait_for("the service to answer again", || http(port, "GET", "/", ""));
    assert_eq!(now, memory, "the same memory (token and hash)");
    assert_eq!(committed_checkpoints(env, name), 0, "no checkpoint was committed");
    assert_eq!(drafts(env, name), Vec::<std::path::PathBuf>::new(), "the draft was discarded");
    assert_eq!(checkpoint_failures(env, name), 0, "a called-off stop is a refusal, not a failed checkpoint");
}

#[test]
fn a_slow_browser_or_tls_client_calls_the_stop_off_at_post_dump() {
    let env = Env::new();
    let (kill, port, memory) = big_service(&env, "slowbrowser");
    let hello: &[u8] = &[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03];
    let cases: [(&[u8], &str, &str); 2] = [
        (
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            "sent an HTTP request",
            "refused an HTTP request on the kill port",
        ),
        (hello, "began a TLS handshake", "refused a TLS handshake on the kill port"),
    ];
    for (i, (sent, reply_says, log_says)) in cases.into_iter().enumerate() {
        let mut reader = admitted_silent(kill, "slowbrowser");
        // Its first bytes come after the silence, while the dump runs.
        reader.get_mut().write_all(sent).unwrap();
        let mut rest = String::new();
        reader.read_to_string(&mut rest).expect("read to the end");
        let last = rest.lines().last().unwrap_or_default();
        assert!(last.starts_with("ERROR the stop was called off"), "{rest}");
        assert!(last.contains(reply_says), "{rest}");
        still_running_untouched(&env, "slowbrowser", port, &memory);
        let log = env.log("slowbrowser");
        assert_eq!(
            log.matches("checkpoint requested through the kill port: dumping, then stopping").count(),
            i + 1,
            "the dump did begin: the stop was called off at post-dump, not at the door\n{log}"
        );
        let refusal = log.lines().find(|l| l.contains(log_says)).unwrap_or_else(|| panic!("{log_says}: {log}"));
        assert!(refusal.contains("called off and slowbrowser keeps running"), "{refusal}");
    }
    // The resumed service is whole: a stop in words takes its checkpoint.
    env.ok(&["stop", "slowbrowser"]);
    assert_eq!(committed_checkpoints(&env, "slowbrowser"), 1);
    assert_eq!(env.status("slowbrowser")["state"], "stopped");
}

#[test]
fn a_silent_client_that_leaves_during_the_dump_calls_the_stop_off() {
    let env = Env::new();
    let (kill, port, memory) = big_service(&env, "leaver");
    drop(admitted_silent(kill, "leaver"));
    let log = wait_for("the stop to be called off", || {
        let log = env.log("leaver");
        log.contains("closed the connection during the dump").then_some(log)
    });
    assert!(log.contains("the stop it asked for by staying silent is called off and leaver keeps running"), "{log}");
    still_running_untouched(&env, "leaver", port, &memory);
}
