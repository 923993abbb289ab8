//! Bad input and failing steps: each must give a clear error naming the file, key or path, a
//! documented exit code, and lose no checkpoint. Every port is picked free at run time.

mod common;
use common::*;
use std::process::Command;

#[test]
fn bad_service_files_are_reported_with_file_line_and_key() {
    let env = Env::new();
    let [p1, p2, p3, p4] = free_ports::<4>();
    let malformed = env.write_service("malformed", "command: [\"/bin/true\"\nuser: nobody\n");
    let unknown = env.write_service(
        "unknown",
        &format!("command: [\"/bin/true\"]\nuser: nobody\nkill_port: {p1}\nkillport: {p2}\ncriu:\n  confg: default\n"),
    );
    let nouser =
        env.write_service("nouser", &format!("command: [\"/bin/true\"]\nuser: no-such-user-xyz\nkill_port: {p3}\n"));
    let badport = "command: [\"/bin/true\"]\nuser: nobody\nkill_port: 99999\n"; // ports: allow (out of range)
    let badport = env.write_service("badport", badport);
    let noprog = env
        .write_service("noprog", &format!("command: [\"definitely-not-a-program\"]\nuser: nobody\nkill_port: {p4}\n"));

    let out = env.run(&["validate"]);
    assert_eq!(out.status.code(), Some(3), "invalid files: exit 3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("invalid {}", malformed.display())), "{text}");
    assert!(text.contains("not valid YAML"), "{text}");
    assert!(text.contains(&format!("invalid {}", unknown.display())), "{text}");
    assert!(text.contains("line 4, key `killport`: unknown key; did you mean `kill_port`?"), "{text}");
    assert!(text.contains("line 6, key `criu.confg`: unknown key; did you mean `config`?"), "{text}");
    assert!(text.contains(&format!("invalid {}", nouser.display())), "{text}");
    assert!(
        text.contains("line 2, key `user`: user \"no-such-user-xyz\" does not exist; create it with `useradd"),
        "{text}"
    );
    assert!(text.contains(&format!("invalid {}", badport.display())) && text.contains("key `kill_port`"), "{text}");
    assert!(text.contains(&format!("invalid {}", noprog.display())) && text.contains("key `command[0]`"), "{text}");

    let json: serde_json::Value = serde_json::from_str(&env.expect_code(&["validate", "nouser", "--json"], 3)).unwrap();
    assert_eq!(json[0]["ok"], false);
    assert_eq!(json[0]["problems"][0]["key"], "user");
    assert_eq!(json[0]["problems"][0]["line"], 2);

    let start = env.run(&["start", "unknown"]);
    assert_eq!(start.status.code(), Some(3), "start refuses a bad file with exit 3");
    let err = String::from_utf8_lossy(&start.stderr);
    assert!(err.contains(&unknown.display().to_string()) && err.contains("killport"), "{err}");

    let missing = env.run(&["start", "ghost"]);
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("ghost.yaml does not exist"));
}

#[test]
fn a_busy_kill_port_is_named_with_its_key_and_file() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    let _taken = std::net::TcpListener::bind(("127.0.0.1", kill)).unwrap();
    let file = env.write_service("busy", &notes_yaml(kill, http_port, ""));
    let out = env.run(&["start", "busy"]);
    assert_eq!(out.status.code(), Some(7), "port in use: exit 7");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{kill}"))
            && err.contains("kill_port")
            && err.contains(&file.display().to_string()),
        "{err}"
    );
    assert_eq!(env.status("busy")["state"], "stopped", "nothing was started");
}

#[test]
fn a_damaged_checkpoint_is_quarantined_and_the_service_cold_starts() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("damaged", &notes_yaml(kill, http_port, ""));
    env.start("damaged");
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "lost").unwrap();
    env.ok(&["stop", "damaged"]);
    let cp = env.checkpoint_dirs("damaged").pop().expect("a checkpoint");
    let id = cp.file_name().unwrap().to_string_lossy().to_string();
    // Damage the process images: every core-*.img loses its contents.
    for e in std::fs::read_dir(cp.join("images")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("core-") {
            std::fs::write(&p, b"garbage").unwrap();
        }
    }
    let started = env.start("damaged");
    assert_eq!(started["started_from"], "cold");
    let reason = started["fallback_reason"].as_str().expect("a fallback reason").to_string();
    assert!(reason.contains(&id) && reason.contains("quarantine"), "{reason}");
    let after = wait_for("cold-started service", || http_json(http_port));
    assert_eq!(after["notes"], serde_json::json!([]), "a cold start has fresh state");

    let st = env.status("damaged");
    assert_eq!(st["state"], "running");
    assert_eq!(st["started_from"], "cold");
    assert_eq!(st["fallback_reason"].as_str().unwrap(), reason);
    assert_eq!(st["checkpoint"], serde_json::Value::Null, "the damaged checkpoint is no longer a candidate");
    let q = env.service_dir("damaged").join("quarantine").join(&id);
    assert!(reason.contains("core-") && reason.contains("verification"), "the damaged image is named: {reason}");
    assert!(!q.join("restore.log").exists(), "the damage was found before CRIU ran on it");
    assert!(q.join("quarantine-reason.txt").is_file());
    let list: serde_json::Value = serde_json::from_str(&env.ok(&["checkpoints", "damaged", "--json"])).unwrap();
    assert_eq!(list["quarantined"][0]["id"], id.as_str());
    // Nothing half-restored is left: only the cold-started tree runs under the supervisor.
    let ps = Command::new("pgrep").args(["-f", &format!("{REPO}/examples/notes/notes.py")]).output().unwrap();
    let mine: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/environ"))
                .unwrap_or_default()
                .contains(&format!("NOTES_PORT={http_port}"))
        })
        .filter(|p| !std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default().contains("__ns-init"))
        .map(str::to_string)
        .collect();
    assert_eq!(mine.len(), 1, "exactly one service process: {mine:?}");
    env.ok(&["stop", "damaged"]);
}

/// A dump that fails (here: the disk holding the checkpoints is full) leaves the service
/// running and the previous checkpoint intact and still the latest.
#[test]
fn a_failed_dump_keeps_the_service_and_the_previous_checkpoint() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("full", &notes_yaml(kill, http_port, ""));
    let checkpoints = env.service_dir("full").join("checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs"])
        .arg(&checkpoints)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a small tmpfs for the checkpoints");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // The checkpoints on it go with it: let go of their network locks first.
            release_criu_tables(&self.0);
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(checkpoints.clone());

    env.start("full");
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "first").unwrap();
    let first: serde_json::Value = serde_json::from_str(&env.ok(&["checkpoint", "full", "--json"])).unwrap();
    let first_id = first["checkpoint"].as_str().unwrap().to_string();
    let first_manifest = std::fs::read(checkpoints.join(&first_id).join("manifest.json")).unwrap();

    // Fill the disk, then leave a little room: the dump starts and CRIU runs out of space.
    let filler = checkpoints.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status();
    assert!(Command::new("truncate").args(["-s", "-1M"]).arg(&filler).status().unwrap().success());
    http(http_port, "POST", "/notes", "second").unwrap();

    let lines = kill_port(kill);
    assert!(lines[0].starts_with("Saving checkpoint"), "{lines:?}");
    let last = lines.last().unwrap();
    assert!(last.starts_with("ERROR "), "{lines:?}");
    assert!(last.contains("keeps running"), "{last}");
    assert!(lines.iter().any(|l| l.contains("Error (")), "CRIU's error lines are quoted: {lines:?}");
    assert!(last.contains("No space left on device"), "the error says the disk is full: {last}");
    let out = env.run(&["stop", "full"]);
    assert_eq!(out.status.code(), Some(5), "failed checkpoint: exit 5");

    let st = env.status("full");
    assert_eq!(st["state"], "running", "the service survived the failed dump");
    assert_eq!(st["checkpoint"], first_id.as_str(), "the previous checkpoint is still the latest");
    let now = wait_for("service still answering", || http_json(http_port));
    assert_eq!(now["notes"], serde_json::json!(["first", "second"]));
    assert_eq!(std::fs::read(checkpoints.join(&first_id).join("manifest.json")).unwrap(), first_manifest);
    let leftovers: Vec<_> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "the failed dump was cleaned up");
    let kept = env.service_dir("full").join("last-failed-dump.log");
    assert!(kept.is_file(), "CRIU's log of the failed dump is kept");
    assert!(last.contains(&kept.display().to_string()), "the error names the kept log: {last}");

    // With space again, the stop works and the restore has both notes.
    std::fs::remove_file(&filler).unwrap();
    env.ok(&["stop", "full"]);
    env.start("full");
    let restored = wait_for("restored", || http_json(http_port));
    assert_eq!(restored["notes"], serde_json::json!(["first", "second"]));
    env.ok(&["stop", "full"]);
}

#[test]
fn a_command_that_cannot_start_leaves_the_service_failed_with_the_reason() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let secret = env.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    env.write_service(
        "denied",
        &format!(
            "command: [\"/bin/sleep\", \"100\"]\nuser: stasis-example\nkill_port: {kill}\nworking_dir: {}\n",
            secret.display()
        ),
    );
    let out = env.run(&["start", "denied"]);
    assert_eq!(out.status.code(), Some(6), "start failed: exit 6");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failed to enter working directory") && err.contains("Permission denied"), "{err}");
    let st = env.status("denied");
    assert_eq!(st["state"], "failed");
    assert!(st["message"].as_str().unwrap().contains("working directory"), "{st}");
}

/// A process that holds a file of its /proc/PID directory open (redis does, briefly, when it
/// reads /proc/self/stat) cannot be restored: that PID will not come back. The dump is refused
/// and retried; one that holds it all the time fails the stop, named, and keeps running.
#[test]
fn a_process_holding_its_proc_files_open_is_not_checkpointed_unrestorable() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    env.write_service(
        "procfd",
        &format!("command: [\"/usr/bin/python3\", \"-c\", \"import time; f = open('/proc/self/stat'); print('holding', flush=True); time.sleep(600)\"]\nuser: stasis-example\nkill_port: {kill}\n"),
    );
    env.start("procfd");
    wait_for("the file to be open", || env.log("procfd").contains("holding").then_some(()));
    let out = env.run(&["stop", "procfd"]);
    assert_eq!(out.status.code(), Some(5), "an unrestorable checkpoint is not taken");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/stat open at the freeze") && err.contains("/proc/"), "{err}");
    assert_eq!(env.status("procfd")["state"], "running", "the service keeps running");
    assert!(env.checkpoint_dirs("procfd").iter().all(|p| p.file_name().unwrap().to_string_lossy().starts_with('.')));
    let err = env.run(&["checkpoint", "procfd"]);
    assert_eq!(err.status.code(), Some(5), "the same for a checkpoint that keeps it running");
}
