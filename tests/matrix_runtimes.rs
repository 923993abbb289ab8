//! Language runtimes checkpointed with the plain service file (no `criu:` section): a JVM
//! (Java 17, run from source by the JRE's source launcher) and Node.js, each an HTTP server
//! holding an in-memory map filled at its start and changed by requests. The programs are
//! tests/programs/StateServer.java and tests/programs/state_server.js; they answer the same
//! requests, so one check serves both. Every port is picked free at run time.

mod common;
use common::*;
use serde_json::Value;
use std::time::Instant;

fn get(port: u16, path: &str) -> String {
    http(port, "GET", path, "").unwrap_or_else(|| panic!("the service on port {port} answers GET {path}"))
}

fn stats(port: u16) -> Value {
    http_json(port).unwrap_or_else(|| panic!("the service on port {port} answers GET /"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is a number in {v}"))
}

/// Changes the map, stops and starts the service twice, and checks after each start that the
/// same process image came back (the id drawn at the cold start), with every change.
fn check_state_survives(env: &Env, name: &str, port: u16) {
    let v = wait_for("the map to be filled", || http_json(port).filter(|v| v["size"] == 100_000));
    let boot = v["boot"].as_str().unwrap().to_string();
    http(port, "POST", "/k/added", "before the stop").unwrap();
    http(port, "POST", "/k/key-7", "changed before the stop").unwrap();
    assert_eq!(get(port, "/k/added"), "before the stop");

    for cycle in 1..=2 {
        let before = stats(port);
        let t = Instant::now();
        env.ok(&["stop", name]);
        let stopped = t.elapsed();
        let t = Instant::now();
        let back = env.start(name);
        let started = t.elapsed();
        assert_eq!(back["started_from"], "checkpoint", "{back}");
        let timings = &env.status(name)["checkpoint_timings"];
        eprintln!("{name} cycle {cycle}: stop {stopped:?}, start {started:?}; checkpoint {timings}");

        let v = stats(port);
        assert_eq!(v["boot"], boot.as_str(), "the same process image, not a cold start: {v}");
        assert_eq!(v["size"], 100_001, "{v}");
        assert!(n(&v, "requests") > n(&before, "requests"), "the request count continues: {before} then {v}");
        assert!(n(&v, "ticks") >= n(&before, "ticks"), "the timer's count continues: {before} then {v}");
        assert_eq!(get(port, "/k/added"), "before the stop");
        assert_eq!(get(port, "/k/key-7"), "changed before the stop");
        assert_eq!(get(port, "/k/key-99999"), "value-99999");
        // Its timers and threads run on.
        let ticks = n(&v, "ticks");
        wait_for("the timer to keep counting", || http_json(port).filter(|v| v["ticks"].as_u64() > Some(ticks + 5)));
    }
    http(port, "POST", "/k/after", "after the start").unwrap();
    assert_eq!(get(port, "/k/after"), "after the start");
    assert_eq!(stats(port)["size"], 100_002);
    env.ok(&["stop", name]);
}

#[test]
fn a_jvm_keeps_its_in_memory_map_across_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    // -XX:-UsePerfData: without it the JVM maps /tmp/hsperfdata_USER/PID, a file it keeps
    // writing and deletes at its exit, and every service's JVM has the same PID (2) in its
    // namespace, so they would share that file.
    env.write_service(
        "jvm",
        &format!(
            "command: [\"/usr/bin/java\", \"-XX:-UsePerfData\", \"-Xmx256m\", \"{REPO}/tests/programs/StateServer.java\"]\nuser: stasis-example\nkill_port: {kill}\nenvironment:\n  PORT: \"{port}\"\n"
        ),
    );
    env.start("jvm");
    check_state_survives(&env, "jvm", port);
}

#[test]
fn node_keeps_its_in_memory_map_across_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service(
        "node",
        &format!(
            "command: [\"/usr/bin/node\", \"{REPO}/tests/programs/state_server.js\"]\nuser: stasis-example\nkill_port: {kill}\nenvironment:\n  PORT: \"{port}\"\n"
        ),
    );
    env.start("node");
    check_state_survives(&env, "node", port);
}
