//! `stasis gc`: the network-lock tables of checkpoints deleted by hand are found and dropped.
//! Alone in its own test binary: `gc --yes` drops every table no checkpoint of its state dir
//! holds, which includes those of tests running beside it.

mod common;
use common::*;
use serde_json::Value;
use std::process::{Command, Stdio};

#[test]
fn gc_finds_and_drops_the_lock_tables_of_checkpoints_deleted_by_hand() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("gc", &notes_yaml(kill, http_port, ""));
    env.start("gc");
    wait_for("service", || http_json(http_port));
    let stopped: Value = serde_json::from_str(&env.ok(&["stop", "gc", "--json"])).unwrap();
    let id = stopped["checkpoint"].as_str().unwrap().to_string();
    let list: Value = serde_json::from_str(&env.ok(&["checkpoints", "gc", "--json"])).unwrap();
    let table =
        list["checkpoints"][0]["network_lock"].as_str().expect("the unrestored checkpoint holds a table").to_string();
    let nft_has = |t: &str| {
        Command::new("nft")
            .args(["list", "table", "inet", t])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(nft_has(&table));
    let gc: Value = serde_json::from_str(&env.ok(&["gc", "--json"])).unwrap();
    assert!(gc["kept_tables"].as_array().unwrap().iter().any(|t| t == table.as_str()), "{gc}");
    assert!(!gc["orphaned_tables"].as_array().unwrap().iter().any(|t| t == table.as_str()), "{gc}");

    // Deleted by hand: nothing in the state dir holds the table any more.
    std::fs::remove_dir_all(env.service_dir("gc").join("checkpoints").join(&id)).unwrap();
    let gc: Value = serde_json::from_str(&env.ok(&["gc", "--json"])).unwrap();
    assert!(gc["orphaned_tables"].as_array().unwrap().iter().any(|t| t == table.as_str()), "{gc}");
    assert!(nft_has(&table), "listing deletes nothing");
    env.ok(&["gc", "--yes"]);
    assert!(!nft_has(&table), "gc --yes dropped {table}");
}
