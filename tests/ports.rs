//! The suite never needs the examples' ports: with every port that examples/*.yaml and
//! scripts/demo use held (as a demo left running holds them), a service on ports picked free
//! starts, stops through its kill port and is restored. `scripts/test` also refuses fixed
//! ports in the tests' service files.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;

/// The number in `key: 7420`, `KEY: "8420"` or `key=7420`, if the line sets a port.
fn port_in(line: &str) -> Option<u16> {
    let line = line.trim();
    let (key, value) = line.split_once(':').or_else(|| line.split_once('='))?;
    let key = key.trim().to_ascii_lowercase();
    if !(key.ends_with("port") && !key.contains(' ')) {
        return None;
    }
    value.trim().trim_matches('"').parse().ok()
}

/// Every port the user-facing examples use: the service files in examples/ and scripts/demo.
fn example_ports() -> BTreeSet<u16> {
    let mut files: Vec<_> = Vec::new();
    for dir in std::fs::read_dir(Path::new(REPO).join("examples")).unwrap().filter_map(Result::ok) {
        for f in std::fs::read_dir(dir.path()).into_iter().flatten().filter_map(Result::ok) {
            if f.path().extension().is_some_and(|e| e == "yaml") {
                files.push(f.path());
            }
        }
    }
    files.push(Path::new(REPO).join("scripts/demo"));
    let ports: BTreeSet<u16> = files
        .iter()
        .flat_map(|f| std::fs::read_to_string(f).unwrap().lines().filter_map(port_in).collect::<Vec<_>>())
        .collect();
    // The demo's notes service at least: its kill port and its HTTP port.
    assert!(ports.contains(&7420) && ports.contains(&8420), "the examples' ports were found: {ports:?}");
    ports
}

#[test]
fn a_leftover_demo_holding_the_example_ports_breaks_nothing() {
    // Held here, or already held by a demo that runs: either way nobody else gets them.
    let mut held = Vec::new();
    for port in example_ports() {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => held.push(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => eprintln!("port {port} is held already"),
            Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
        }
    }
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    assert!(!example_ports().contains(&kill) && !example_ports().contains(&http_port));
    env.write_service("notes", &notes_yaml(kill, http_port, ""));
    assert_eq!(env.start("notes")["started_from"], "cold");
    wait_for("notes to answer", || http_json(http_port));
    http(http_port, "POST", "/notes", "beside the demo").expect("post a note");
    let lines = kill_port(kill);
    assert!(lines.last().unwrap().starts_with("OK checkpoint "), "{lines:?}");
    wait_for("the supervisor to exit", || (env.status("notes")["state"] == "stopped").then_some(()));
    assert_eq!(env.start("notes")["started_from"], "checkpoint");
    let after = wait_for("restored notes to answer", || http_json(http_port));
    assert_eq!(after["notes"], serde_json::json!(["beside the demo"]));
    env.ok(&["stop", "notes"]);
    drop(held);
}
