//! Hygiene of what root touches and prints: privileges dropped before the service's paths are
//! entered, outside text escaped before it reaches a terminal, private files whatever the
//! caller's umask, and a kill port held by someone else named with its holder.

use super::common::*;
use std::os::unix::fs::PermissionsExt;

fn chown_to(path: &std::path::Path, user: &str) {
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(uid_of_user(user))), None).unwrap();
}

/// The service points its `working_dir` (a symlink it owns) below a directory only root may
/// enter. A readiness probe that entered it as root would read `secret` for the service.
#[test]
fn the_readiness_probe_enters_the_working_dir_as_the_service_user() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let vault = env.path().join("vault");
    std::fs::create_dir_all(vault.join("inner")).unwrap();
    std::fs::set_permissions(&vault, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(vault.join("inner/secret"), "root's secret\n").unwrap();
    let own = env.path().join("own");
    std::fs::create_dir_all(own.join("home")).unwrap();
    chown_to(&own, "stasis-example");
    chown_to(&own.join("home"), "stasis-example");
    let link = own.join("wd");
    std::os::unix::fs::symlink(own.join("home"), &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(uid_of_user("stasis-example")), None).unwrap();
    // Once running, the service swings its link into the vault.
    let swing = format!(
        "ln -sfn {inner} {own}/wd.new && mv -Tf {own}/wd.new {own}/wd; exec sleep 600",
        inner = vault.join("inner").display(),
        own = own.display()
    );
    env.write_service(
        "prober",
        &format!(
            "command: [\"/bin/sh\", \"-c\", \"{swing}\"]\nuser: stasis-example\nkill_port: {kill}\nworking_dir: {}\nready:\n  exec: [\"cat\", \"secret\"]\nready_timeout: 2s\n",
            link.display()
        ),
    );
    env.adopt("prober");
    let out = env.run(&["start", "prober"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "the probe must not read the vault: {err}");
    assert!(err.contains("ready_timeout (2s)") && err.contains("could not enter the working directory"), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
}

/// Bytes that drive a terminal: ESC, BEL, CR and the 8-bit CSI (alone, or UTF-8 encoded).
fn drives_a_terminal(bytes: &[u8]) -> bool {
    bytes.iter().any(|b| matches!(b, 0x1b | 0x07 | b'\r' | 0x9b))
}

/// A deleted file the service keeps open, too big for CRIU's ghost limit: the dump fails and
/// CRIU's error (and stasis's advice) names the file, whose name is an attack on the terminal.
#[test]
fn an_escape_code_file_name_reaches_no_terminal_raw() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let dir = env.path().join("ghosts");
    std::fs::create_dir(&dir).unwrap();
    chown_to(&dir, "stasis-example");
    env.write_service(
        "ghostly",
        &format!(
            "command: [\"/usr/bin/python3\", \"{REPO}/tests/programs/ghost_name.py\"]\nuser: stasis-example\nkill_port: {kill}\nenvironment:\n  GHOST_DIR: \"{}\"\n",
            dir.display()
        ),
    );
    env.start("ghostly");
    wait_for("the ghost file", || env.log("ghostly").contains("ready").then_some(()));

    let out = env.run(&["stop", "ghostly"]);
    assert_eq!(out.status.code(), Some(5), "the dump fails on the ghost file");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Can't dump ghost file"), "CRIU's error is quoted: {err}");
    assert!(!drives_a_terminal(&out.stdout), "stdout: {:?}", String::from_utf8_lossy(&out.stdout));
    assert!(!drives_a_terminal(&out.stderr), "stderr: {err:?}");
    assert!(err.contains("evil\\x1b]0;pwned\\x07\\x1b[2K\\rOK checkpoint"), "shown escaped: {err}");

    let out = env.run(&["stop", "ghostly", "--json"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(!drives_a_terminal(&out.stdout) && !drives_a_terminal(&out.stderr), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stop --json prints JSON");
    let text = v.to_string();
    assert!(v["error"].as_str().is_some_and(|e| e.contains("evil\\x1b]0;pwned")), "{text}");
    assert!(!text.contains('\u{1b}') && !text.contains('\u{9b}'), "the strings themselves are safe: {text:?}");

    let log = std::fs::read(env.service_dir("ghostly").join("service.log")).unwrap();
    assert!(!drives_a_terminal(&log), "service.log: {:?}", String::from_utf8_lossy(&log));
    assert!(String::from_utf8_lossy(&log).contains("evil\\x1b]0;pwned"), "the log names it, escaped");
    let sup = std::fs::read(env.service_dir("ghostly").join("supervisor.log")).unwrap_or_default();
    assert!(!drives_a_terminal(&sup), "supervisor.log: {:?}", String::from_utf8_lossy(&sup));
    assert_eq!(env.status("ghostly")["state"], "running", "a failed dump leaves the service running");
}

/// `umask 000` in the caller's shell must not make the supervisor's files world-writable.
#[test]
fn the_callers_umask_does_not_reach_the_supervisors_files() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    env.write_service(
        "masked",
        &format!(
            "command: [\"/bin/sh\", \"-c\", \"umask; exec sleep 600\"]\nuser: stasis-example\nkill_port: {kill}\n"
        ),
    );
    env.adopt("masked");
    // `sh -c 'umask 000; exec stasis start masked'`, with the harness's directories.
    let dirs = env.cmd(&[]);
    let mut sh = std::process::Command::new("/bin/sh");
    sh.envs(dirs.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .args(["-c", &format!("umask 000; exec {BIN} start masked")]);
    let out = logged(&["start", "masked", "(umask 000)"], sh);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let mode = |p: &std::path::Path| std::fs::symlink_metadata(p).map(|m| m.permissions().mode() & 0o7777).unwrap();
    let log = env.service_dir("masked").join("supervisor.log");
    assert_eq!(mode(&log) & 0o077, 0, "supervisor.log is root's alone: {:o}", mode(&log));
    // The service keeps a conventional umask, not the supervisor's nor the caller's.
    wait_for("the service's umask line", || env.log("masked").lines().any(|l| l.trim() == "0022").then_some(()));
    env.ok(&["stop", "masked"]);

    let slots: Vec<_> = walk(&env.path().join("run/slots")).into_iter().filter(|p| p.is_file()).collect();
    assert!(!slots.is_empty(), "the stop took a dump slot");
    for p in &slots {
        assert_eq!(mode(p) & 0o077, 0, "{} is {:o}", p.display(), mode(p));
    }
    let all = walk(&env.state_dir());
    assert!(all.len() > 3, "the state dir has files");
    for p in all.iter().chain(&slots).filter(|p| !p.is_symlink()) {
        assert_eq!(mode(p) & 0o022, 0, "{} is {:o}: group or others may write", p.display(), mode(p));
    }
}

/// Every path under `dir`, directories included.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok) {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// Any user may bind a stopped service's kill port; `start` then names who did.
#[test]
fn a_kill_port_taken_by_another_user_names_the_holder() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let listen = format!(
        "import socket, sys, time\ns = socket.socket()\ns.bind(('127.0.0.1', {kill}))\ns.listen()\nprint('listening', flush=True)\ntime.sleep(600)\n"
    );
    let mut squatter = std::process::Command::new("setpriv")
        .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "/usr/bin/python3", "-c", &listen])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv");
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(squatter.stdout.take().unwrap()), &mut first).unwrap();
    assert_eq!(first.trim(), "listening");

    env.write_service(
        "squatted",
        &format!("command: [\"/bin/sleep\", \"600\"]\nuser: stasis-example\nkill_port: {kill}\n"),
    );
    env.adopt("squatted");
    let out = env.run(&["start", "squatted"]);
    let _ = squatter.kill();
    let _ = squatter.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "a kill port in use is exit 7 (environment): {err}");
    let said = format!("pid {} (python3) of user nobody (uid {})", squatter.id(), uid_of_user("nobody"));
    assert!(err.contains(&said), "the holder is named ({said}): {err}");
}
