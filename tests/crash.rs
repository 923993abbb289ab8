//! Crashes and what is said about them: the namespace init reports the command's own status
//! (a `kill -9` of the main process is a failure whatever its children do), a resource CRIU
//! cannot dump is named plainly at stop and doctor, and waits on a terminal are never silent.

mod common;
use common::*;

/// Pids of live processes whose command line contains `marker` (a path under the test's dir),
/// but the namespace init, whose arguments hold the command.
fn pids_with(marker: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(marker) && !cmdline.contains("__ns-init") && !is_gone(*pid)
        })
        .collect();
    pids.sort();
    pids
}

fn script(env: &Env, name: &str, body: &str) -> String {
    let path = env.path().join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    path.display().to_string()
}

fn service_yaml(kill_port: u16, command: &str, extra: &str) -> String {
    format!(
        "command: [\"/bin/sh\", \"{command}\"]\nuser: stasis-example\nkill_port: {kill_port}\nrestart: on-failure\nrestart_backoff: 100ms\nrestart_limit: 5 in 1m\n{extra}"
    )
}

#[test]
fn a_kill_9_of_the_main_process_is_a_failure_even_while_a_child_ignoring_sigterm_lives_on() {
    let env = Env::new();
    let [kill_port] = free_ports::<1>();
    // The child ignores SIGTERM (kept across exec, so its sleeps do too) and never ends by itself.
    let child = script(&env, "stubborn.sh", "trap '' TERM\nwhile :; do sleep 1; done");
    let main = script(&env, "main.sh", &format!("/bin/sh {child} &\necho started\nwhile :; do sleep 1; done"));
    env.write_service("crashy", &service_yaml(kill_port, &main, ""));
    env.start("crashy");
    let first = wait_for("the main process and its child", || {
        let (m, c) = (pids_with(&main), pids_with(&child));
        (m.len() == 1 && c.len() == 1).then(|| (m[0], c[0]))
    });
    verified_kill(first.0, &[&main]);
    let back = wait_for("the service restarted after the kill", || {
        let s = env.status("crashy");
        (s["restarts"] == 1 && s["state"] == "running").then_some(s)
    });
    let log = env.log("crashy");
    assert!(
        log.contains("the service exited with status 137 (its command was killed by SIGKILL); restarting it"),
        "{log}"
    );
    // The crashed run's stubborn child went with it; the new run has its own.
    wait_for("the old child gone", || is_gone(first.1).then_some(()));
    let again = wait_for("the new run's processes", || {
        let (m, c) = (pids_with(&main), pids_with(&child));
        (m.len() == 1 && c.len() == 1).then(|| (m[0], c[0]))
    });
    assert_ne!(again, first, "{back}");
    env.ok(&["stop", "crashy"]);
}

#[test]
fn a_daemon_that_went_to_the_background_keeps_the_service_up_and_its_kill_9_is_a_failure() {
    let env = Env::new();
    let [kill_port] = free_ports::<1>();
    let daemon = script(&env, "daemon.sh", "while :; do sleep 1; done");
    // The command exits 0 at once, as a forking daemon's parent does.
    let launcher = script(&env, "launcher.sh", &format!("/bin/sh {daemon} &\nexit 0"));
    env.write_service("forking", &service_yaml(kill_port, &launcher, ""));
    env.start("forking");
    let pid = wait_for("the daemon alone", || {
        let (l, d) = (pids_with(&launcher), pids_with(&daemon));
        (l.is_empty() && d.len() == 1).then(|| d[0])
    });
    assert_eq!(env.status("forking")["state"], "running", "the service lives on in its daemon");
    // The daemon's `sleep 1` is orphaned and ends with 0 after it: the service's status is still
    // the daemon's.
    verified_kill(pid, &[&daemon]);
    wait_for("the service restarted after the daemon's kill", || {
        let s = env.status("forking");
        (s["restarts"] == 1 && s["state"] == "running").then_some(s)
    });
    let log = env.log("forking");
    assert!(log.contains("exited with status 137 (its command was killed by SIGKILL)"), "{log}");
    env.ok(&["stop", "forking"]);
}

#[test]
fn an_io_uring_is_named_plainly_at_stop_and_doctor_and_the_service_keeps_running() {
    let env = Env::new();
    let [kill_port] = free_ports::<1>();
    let program = env.path().join("io_uring_holder");
    let source = format!("{REPO}/tests/programs/io_uring_holder.c");
    let built = std::process::Command::new("gcc").arg("-O1").arg("-o").arg(&program).arg(&source).status().unwrap();
    assert!(built.success(), "gcc {source}");
    let program = program.display().to_string();
    env.write_service("uring", &format!("command: [\"{program}\"]\nuser: stasis-example\nkill_port: {kill_port}\n"));
    env.start("uring");
    wait_for("the ring set up", || env.log("uring").contains("io_uring fd 3 ready").then_some(()));
    let pid = pid_in(&env.status("uring")["pid"]).expect("a pid");
    let says = |out: &std::process::Output| {
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        for part in [
            &format!("pid {pid} (`{program}`) holds an io_uring instance") as &str,
            "CRIU cannot save an io_uring",
            "`stasis stop uring --no-checkpoint`",
        ] {
            assert!(text.contains(part), "{part:?} not in {text}");
        }
        // CRIU's own words only after the plain ones, as detail, in the error message itself.
        let message = text.lines().find(|l| l.contains("holds an io_uring")).unwrap();
        let plain = message.find("holds an io_uring").unwrap();
        assert!(message.find("Unknown shit").is_none_or(|raw| raw > plain), "{message}");
    };
    let stop = env.run(&["stop", "uring"]);
    assert_eq!(stop.status.code(), Some(5), "a checkpoint that cannot be taken is exit 5");
    says(&stop);
    assert_eq!(env.status("uring")["state"], "running");
    assert!(!is_gone(pid), "the service keeps running after the failed stop");
    let doctor = env.run(&["doctor", "uring"]);
    assert_eq!(doctor.status.code(), Some(5), "doctor: the checkpoint would fail");
    says(&doctor);
    assert!(!is_gone(pid));
}

#[test]
fn a_readiness_wait_says_what_it_waits_for_each_second() {
    let env = Env::new();
    let [kill_port, kill_port2, port] = free_ports::<3>();
    // Listens only after 3 s: the wait lasts that long. SO_REUSEADDR: the second service binds
    // the same port while the first one's closed probe connections linger in TIME_WAIT.
    let server = format!(
        "import socket, time\ntime.sleep(3)\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1', {port}))\ns.listen()\nwhile True:\n    s.accept()[0].close()\n"
    );
    let script = env.path().join("late_listener.py");
    std::fs::write(&script, server).unwrap();
    let yaml = format!(
        "command: [\"/usr/bin/python3\", \"{}\"]\nuser: stasis-example\nkill_port: {kill_port}\nready:\n  tcp: 127.0.0.1:{port}\nready_timeout: 30s\n",
        script.display()
    );
    env.write_service("late", &yaml);
    env.adopt("late");
    let quiet = env.run(&["start", "late"]);
    assert_eq!(quiet.status.code(), Some(0));
    // Not on a terminal and not asked for: nothing a second in a log.
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("waiting for"), "{quiet:?}");
    env.ok(&["stop", "late"]);
    // The same service under another name, cold (a restore is ready at once): asked for.
    env.write_service(
        "late2",
        &yaml.replace(&format!("kill_port: {kill_port}\n"), &format!("kill_port: {kill_port2}\n")),
    );
    env.adopt("late2");
    let mut cmd = env.cmd(&["start", "late2"]);
    cmd.env("STASIS_PROGRESS", "1");
    let shown = logged(&["start", "late2"], cmd);
    assert_eq!(shown.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&shown.stderr);
    assert!(stderr.contains(&format!("waiting for 127.0.0.1:{port} to accept connections (")), "{stderr}");
    assert!(stderr.contains(" s of 30s)"), "{stderr}");
    env.ok(&["stop", "late2"]);
}

/// A CRIU whose dumps of this test's services take 2 s more at `post-dump` (the service still
/// frozen): an action script can only be added by wrapping the binary, as root may.
fn slow_criu(env: &Env) -> std::path::PathBuf {
    let real = which::which_in("criu", Some("/usr/local/sbin:/usr/sbin:/sbin"), "/").expect("criu");
    let script = env.path().join("slow.sh");
    std::fs::write(&script, "#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] && sleep 2\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let wrapper = env.path().join("criu-slow");
    let (real, script, state) = (real.display(), script.display(), env.state_dir().display().to_string());
    std::fs::write(
        &wrapper,
        // A dump is a `criu swrk` conversation; a wrapper has only the supervisor (its parent) to
        // tell whose: this test's state dir is on its command line.
        format!("#!/bin/sh\ncase \"$*\" in *swrk*) if tr '\\0' ' ' </proc/$PPID/cmdline | grep -q -- '{state} '; then exec {real} \"$@\" --action-script {script}; fi ;; esac\nexec {real} \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    wrapper
}

#[test]
fn ctrl_c_during_stop_says_the_checkpoint_goes_on_and_it_does() {
    use std::io::BufRead;
    let env = Env::new();
    let [kill_port, http_port] = free_ports::<2>();
    env.write_service("notes", &notes_yaml(kill_port, http_port, ""));
    env.adopt("notes");
    let slow = slow_criu(&env);
    assert!(env.cmd(&["start", "notes"]).env("STASIS_CRIU", &slow).status().unwrap().success());
    wait_for("notes", || http_json(http_port));
    http(http_port, "POST", "/notes", "kept through ctrl-c").unwrap();
    let mut stop = env
        .cmd(&["stop", "notes"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(stop.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.starts_with("Saving checkpoint of notes"), "{first}");
    // Our own child: the pid is not reused before we wait for it.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(stop.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let done = stop.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    eprintln!("stop after ctrl-c: {:?}\n{stderr}", done.status);
    assert_eq!(done.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("the checkpoint of notes continues"), "{stderr}");
    assert!(stderr.contains("`stasis status notes`") && stderr.contains("`stasis logs notes`"), "{stderr}");
    let st = wait_for("the service stopped by its supervisor", || {
        let s = env.status("notes");
        (s["state"] == "stopped" && s["supervisor_pid"].is_null()).then_some(s)
    });
    assert!(!env.checkpoint_dirs("notes").is_empty(), "{st}");
    env.start("notes");
    let notes = wait_for("notes back", || http_json(http_port));
    assert!(notes.to_string().contains("kept through ctrl-c"), "{notes}");
    env.ok(&["stop", "notes"]);
}
