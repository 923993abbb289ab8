//! The daily verbs: `stop --no-checkpoint`, `restart [--cold]`, `checkpoints --delete` and
//! `--prune`, `start --from ID --force` of a quarantined checkpoint, `gc` that deletes only
//! the tables its own state dir recorded, and `remove --purge` that keeps working directories.

mod common;
use common::*;
use serde_json::Value;
use std::process::{Command, Stdio};

fn nft_has(table: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", table])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Stops `name` with a checkpoint; returns its id and the network-lock table it holds.
fn stop_with_checkpoint(env: &Env, name: &str) -> (String, String) {
    let stopped = json(&env.ok(&["stop", name, "--json"]));
    let id = stopped["checkpoint"].as_str().expect("a checkpoint id").to_string();
    let list = json(&env.ok(&["checkpoints", name, "--json"]));
    let row = list["checkpoints"].as_array().unwrap().iter().find(|c| c["id"] == id.as_str()).unwrap().clone();
    let table = row["network_lock"].as_str().expect("the unrestored checkpoint holds a table").to_string();
    (id, table)
}

/// Every process below `pid`, through /proc/PID/task/TID/children.
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"))
            .map(|rd| rd.filter_map(Result::ok).collect::<Vec<_>>())
            .unwrap_or_default();
        for t in tasks {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for k in kids.split_whitespace().filter_map(|k| k.parse().ok()) {
                out.push(k);
                todo.push(k);
            }
        }
    }
    out
}

fn notes(port: u16) -> Vec<Value> {
    http_json(port).expect("the service answers")["notes"].as_array().unwrap().clone()
}

#[test]
fn stop_without_a_checkpoint_ends_the_whole_tree_and_takes_no_checkpoint() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    // A child that ignores SIGTERM: only the SIGKILL after stop_timeout_secs ends it.
    let yaml = format!(
        "command: [\"/bin/sh\", \"-c\", \"trap '' TERM; sleep 1000 & exec /usr/bin/python3 {REPO}/examples/notes/notes.py\"]\nuser: stasis-example\nkill_port: {kill}\nstop_timeout_secs: 2\nenvironment:\n  NOTES_PORT: \"{http_port}\"\n"
    );
    env.write_service("plain", &yaml);
    env.start("plain");
    wait_for("service", || http_json(http_port));
    let (first, _) = stop_with_checkpoint(&env, "plain");
    let started = env.start("plain");
    assert_eq!(started["started_from"], "checkpoint", "{started}");
    wait_for("service", || http_json(http_port));
    let st = env.status("plain");
    let init = pid_in(&st["init_pid"]).unwrap();
    let sleeper = wait_for("the sleeping child", || {
        descendants(init)
            .into_iter()
            .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep"))
    });
    let main = pid_in(&st["pid"]).unwrap();

    let out = json(&env.ok(&["stop", "plain", "--no-checkpoint", "--json"]));
    assert_eq!(out["stopped"], true, "{out}");
    assert!(out["checkpoint"].is_null(), "{out}");
    assert_eq!(out["newest_checkpoint"], first.as_str(), "{out}");
    assert_eq!(out["next_start"], "cold", "{out}");
    assert!(out["note"].as_str().unwrap().contains("older than this run"), "{out}");
    for pid in [init, main, sleeper] {
        assert!(is_gone(pid), "pid {pid} of the tree is still there");
    }
    let st = env.status("plain");
    assert_eq!(st["state"], "stopped", "{st}");
    assert!(st["message"].as_str().unwrap_or_default().contains("without a checkpoint"), "{st}");
    let ids: Vec<String> =
        env.checkpoint_dirs("plain").iter().map(|d| d.file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(ids, vec![first.clone()], "no new checkpoint");
    assert!(env.log("plain").contains("SIGKILL"), "the child ignoring SIGTERM was killed after the grace period");
    // Stopped already: said, exit 0.
    let again = env.ok(&["stop", "plain", "--no-checkpoint"]);
    assert!(again.contains("already stopped"), "{again}");
    // The next start cold-starts, as the output said.
    assert_eq!(env.start("plain")["started_from"], "cold");
}

#[test]
fn restart_keeps_the_memory_and_restart_cold_starts_fresh() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("re", &notes_yaml(kill, http_port, ""));
    env.start("re");
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "kept across the restart").unwrap();
    let out = json(&env.ok(&["restart", "re", "--json"]));
    assert!(out["stopped"]["checkpoint"].is_string(), "{out}");
    assert_eq!(out["start"]["started_from"], "checkpoint", "{out}");
    assert_eq!(out["start"]["checkpoint"], out["stopped"]["checkpoint"], "{out}");
    assert_eq!(notes(http_port), vec![Value::from("kept across the restart")]);

    let before = env.checkpoint_dirs("re").len();
    let out = json(&env.ok(&["restart", "re", "--cold", "--json"]));
    assert!(out["stopped"]["checkpoint"].is_null(), "{out}");
    assert_eq!(out["stopped"]["was_running"], true, "{out}");
    assert_eq!(out["start"]["started_from"], "cold", "{out}");
    wait_for("service", || http_json(http_port));
    assert!(notes(http_port).is_empty(), "fresh memory");
    assert_eq!(env.checkpoint_dirs("re").len(), before, "no checkpoint taken, none deleted");
    assert_eq!(env.status("re")["state"], "running");
}

#[test]
fn delete_and_prune_refuse_the_only_fresh_checkpoint_and_release_lock_tables() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("del", &notes_yaml(kill, http_port, "keep_checkpoints: 5\n"));
    let mut ids = Vec::new();
    for _ in 0..3 {
        env.start("del");
        wait_for("service", || http_json(http_port));
        ids.push(stop_with_checkpoint(&env, "del"));
    }
    let (fresh, fresh_table) = ids[2].clone();
    assert!(nft_has(&fresh_table));

    // Running: the supervisor may dump or restore at any moment.
    env.start("del");
    wait_for("service", || http_json(http_port));
    let err = env.expect_code(&["checkpoints", "del", "--delete", &ids[0].0], 4);
    assert!(err.is_empty());
    env.ok(&["stop", "del", "--no-checkpoint"]);
    // That run made every checkpoint stale; a stop with a checkpoint makes a fresh one.
    env.start("del");
    wait_for("service", || http_json(http_port));
    let (newest, newest_table) = stop_with_checkpoint(&env, "del");

    let out = env.run(&["checkpoints", "del", "--delete", &newest]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only fresh checkpoint"), "{out:?}");
    assert!(env.service_dir("del").join("checkpoints").join(&newest).is_dir());
    assert!(nft_has(&newest_table), "a refused delete releases nothing");

    // An older, stale one goes without --force.
    let deleted = json(&env.ok(&["checkpoints", "del", "--delete", &fresh, "--json"]));
    assert_eq!(deleted["deleted"][0]["id"], fresh.as_str(), "{deleted}");
    assert!(!env.service_dir("del").join("checkpoints").join(&fresh).exists());
    let out = env.expect_code(&["checkpoints", "del", "--delete", "00000099-nonexistent"], 3);
    assert!(out.is_empty());

    // Prune to 1: the newest stays, the others go.
    env.ok(&["checkpoints", "del", "--prune", "1"]);
    let left: Vec<String> =
        env.checkpoint_dirs("del").iter().map(|d| d.file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(left, vec![newest.clone()]);
    env.expect_code(&["checkpoints", "del", "--prune", "0"], 3);
    assert!(nft_has(&newest_table));

    let deleted = json(&env.ok(&["checkpoints", "del", "--delete", &newest, "--force", "--json"]));
    assert_eq!(deleted["deleted"][0]["network_lock"], newest_table.as_str(), "{deleted}");
    assert!(!nft_has(&newest_table), "its network-lock table went with it");
    assert!(env.checkpoint_dirs("del").is_empty());
    assert_eq!(env.start("del")["started_from"], "cold");
}

#[test]
fn gc_deletes_only_tables_its_state_dir_recorded_and_whose_checkpoint_is_gone() {
    let ours = Env::new();
    let other = Env::new();
    let [k1, h1, k2, h2] = free_ports::<4>();
    other.write_service("gc-other", &notes_yaml(k2, h2, ""));
    other.start("gc-other");
    wait_for("service", || http_json(h2));
    let (_, other_table) = stop_with_checkpoint(&other, "gc-other");

    ours.write_service("gc-ours", &notes_yaml(k1, h1, ""));
    ours.start("gc-ours");
    wait_for("service", || http_json(h1));
    let (id, our_table) = stop_with_checkpoint(&ours, "gc-ours");
    let gc = json(&ours.ok(&["gc", "--json"]));
    assert!(gc["kept_tables"].as_array().unwrap().iter().any(|t| t == our_table.as_str()), "{gc}");
    assert!(gc["not_ours_tables"].as_array().unwrap().iter().any(|t| t["table"] == other_table.as_str()), "{gc}");
    assert!(!gc["orphaned_tables"].as_array().unwrap().iter().any(|t| t == other_table.as_str()), "{gc}");

    // Deleted by hand in this state dir: provably ours and gone.
    std::fs::remove_dir_all(ours.service_dir("gc-ours").join("checkpoints").join(&id)).unwrap();
    let gc = json(&ours.ok(&["gc", "--json"]));
    assert_eq!(gc["orphaned_tables"], serde_json::json!([our_table]), "{gc}");
    let out = ours.ok(&["gc", "--yes"]);
    assert!(out.contains(&format!("not ours: table inet {other_table}")), "{out}");
    assert!(!nft_has(&our_table), "gc --yes dropped {our_table}");
    assert!(nft_has(&other_table), "the other state dir's table is left alone");
    // The other state dir still restores its checkpoint, connections and all.
    assert_eq!(other.start("gc-other")["started_from"], "checkpoint");
}

#[test]
fn remove_purge_keeps_a_working_directory_another_service_uses() {
    let env = Env::new();
    let [k1, h1, k2, h2] = free_ports::<4>();
    // The directory `add` makes for a service, used by a second one too.
    let shared = env.state_dir().join("work").join("purged");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("data.txt"), "the other service's data").unwrap();
    let wd = format!("working_dir: {}\n", shared.display());
    env.write_service("purged", &notes_yaml(k1, h1, &wd));
    env.write_service("sharer", &notes_yaml(k2, h2, &wd));
    env.start("purged");
    wait_for("service", || http_json(h1));
    let (_, table) = stop_with_checkpoint(&env, "purged");
    let out = env.ok(&["remove", "purged", "--purge"]);
    assert!(out.contains("kept working directory"), "{out}");
    assert!(shared.join("data.txt").is_file(), "the shared working directory is still there");
    assert!(!env.service_dir("purged").exists(), "its own state dir is gone");
    assert!(!nft_has(&table), "its checkpoint's table was released");
    env.start("sharer");
    wait_for("the other service", || http_json(h2));
}

#[test]
fn a_quarantined_checkpoint_comes_back_only_when_it_verifies() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("quar", &notes_yaml(kill, http_port, ""));
    env.start("quar");
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "precious").unwrap();
    let (id, _) = stop_with_checkpoint(&env, "quar");
    let images = env.service_dir("quar").join("checkpoints").join(&id).join("images");
    let pages = std::fs::read_dir(&images)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("pages-"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let name = pages.file_name().unwrap().to_owned();
    let flip = |path: &std::path::Path| {
        let mut bytes = std::fs::read(path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        std::fs::write(path, bytes).unwrap();
    };
    flip(&pages);
    // The damage is found before CRIU reads it: quarantined, cold start.
    let started = env.start("quar");
    assert_eq!(started["started_from"], "cold", "{started}");
    let quarantined = env.service_dir("quar").join("quarantine").join(&id);
    assert!(quarantined.is_dir());
    let list = json(&env.ok(&["checkpoints", "quar", "--json"]));
    assert_eq!(list["quarantined"][0]["id"], id.as_str(), "{list}");
    assert!(list["quarantined"][0]["reason"].as_str().unwrap().contains("checksum"), "{list}");
    env.ok(&["stop", "quar", "--no-checkpoint"]);

    let out = env.run(&["start", "quar", "--from", &id]);
    assert_eq!(out.status.code(), Some(10));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"), "{out:?}");
    // Still damaged: it stays where it is, and the error names the image.
    let out = env.run(&["start", "quar", "--from", &id, "--force"]);
    assert_eq!(out.status.code(), Some(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match its checksum") && err.contains("stays quarantined"), "{err}");
    assert!(quarantined.join("images").join(&name).is_file());
    assert!(env.checkpoint_dirs("quar").is_empty());

    // The bit flipped back (a passing disk error): verified, back in the store, restored.
    flip(&quarantined.join("images").join(&name));
    let out = env.ok(&["start", "quar", "--from", &id, "--force", "--json"]);
    let started = json(&out);
    assert_eq!(started["started_from"], "checkpoint", "{started}");
    assert_eq!(started["checkpoint"], id.as_str());
    wait_for("service", || http_json(http_port));
    assert_eq!(notes(http_port), vec![Value::from("precious")], "the memory it held is back");
    assert!(!quarantined.exists());
    assert!(env.service_dir("quar").join("checkpoints").join(&id).is_dir());
}
