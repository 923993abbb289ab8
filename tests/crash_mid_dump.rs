//! A stop interrupted at each step of its one conversation with CRIU: CRIU, or the supervisor,
//! SIGKILLed right after the supervisor answered `pre-dump` or `post-dump` (the notifications of
//! a dump of a service in the host's network namespace: CRIU sends `network-lock` only for a
//! tree with a network namespace of its own, criu/net.c `network_lock`).
//! Whatever dies, the service's memory is never lost: either the service still runs with it,
//! or it is gone and a complete checkpoint restores it. An incomplete checkpoint is never taken
//! for one.

mod common;
use common::*;
use nix::sys::signal::Signal;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// A CRIU wrapper for this test's dumps whose action script (run by CRIU right after the
/// supervisor answered the same notification over RPC) SIGKILLs `victim` at `action`: `criu`
/// is the script's parent, `supervisor` criu's parent, each checked to be this test's first.
fn killing_criu(env: &Env, action: &str, victim: &str) -> PathBuf {
    let real = which::which_in("criu", Some("/usr/local/sbin:/usr/sbin:/sbin"), "/").expect("criu");
    let state = env.state_dir().display().to_string();
    let script = env.path().join("kill.sh");
    let pick = match victim {
        // criu sets its own title (`dump --rpc ...`): the binary names it.
        "criu" => "pid=$PPID; marker=criu",
        _ => "pid=$(cut -d' ' -f4 /proc/$PPID/stat); marker=__supervise",
    };
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$CRTOOLS_SCRIPT_ACTION $PPID\" >>{trace}\n[ \"$CRTOOLS_SCRIPT_ACTION\" = {action} ] || exit 0\n{pick}\n\
             cmd=$(tr '\\0' ' ' </proc/$pid/cmdline)\n\
             if [ $marker = criu ]; then [ \"$(readlink /proc/$pid/exe)\" = {real} ] || exit 0; else case \"$cmd\" in *$marker*) ;; *) exit 0 ;; esac; fi\n\
             if [ $marker = __supervise ]; then case \"$cmd\" in *'{state} '*) ;; *) exit 0 ;; esac; fi\n\
             touch {marker_file}\nkill -9 $pid\nexit 0\n",
            marker_file = env.path().join("killed").display(),
            trace = env.path().join("actions").display(),
            real = real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let wrapper = env.path().join("criu-killing");
    let (real, script) = (real.display(), script.display());
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\ncase \"$*\" in *swrk*) if tr '\\0' ' ' </proc/$PPID/cmdline | grep -q -- '{state} '; then exec {real} \"$@\" --action-script {script}; fi ;; esac\nexec {real} \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

fn interrupted_stop(action: &str, victim: &str) {
    let env = Env::new();
    let name = "crashy";
    let [kill, http_port] = free_ports::<2>();
    env.write_service(name, &notes_yaml(kill, http_port, ""));
    env.adopt(name);
    let wrapper = killing_criu(&env, action, victim);
    assert!(env.cmd(&["start", name]).env("STASIS_CRIU", &wrapper).status().unwrap().success());
    let before = wait_for("the service", || http_json(http_port));
    http(http_port, "POST", "/notes", "survives").expect("post a note");
    let st = env.status(name);
    let (supervisor, init) = (pid_in(&st["supervisor_pid"]).unwrap(), pid_in(&st["init_pid"]).unwrap());

    let stop = env.run(&["stop", name]);
    eprintln!("stop with {victim} killed at {action}: {:?}\n{}", stop.status, String::from_utf8_lossy(&stop.stderr));
    let actions = std::fs::read_to_string(env.path().join("actions")).unwrap_or_default();
    assert!(env.path().join("killed").exists(), "the wrapper's script never killed {victim} at {action}: {actions}");
    let state = env.state_dir().display().to_string();
    // Settled: the tree either answers or is gone (a dead CRIU or supervisor leaves no wait).
    let answering = wait_for("the service to answer or be gone", || match http_json(http_port) {
        Some(v) => Some(Some(v)),
        None if is_gone(init) => Some(None),
        None => None,
    });
    // `.incomplete-ID` directories a dead supervisor left are no checkpoints (gc removes them).
    let checkpoints: Vec<PathBuf> = env
        .checkpoint_dirs(name)
        .into_iter()
        .filter(|d| !d.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    for dir in &checkpoints {
        assert!(dir.join("manifest.json").is_file(), "{} is listed without a manifest", dir.display());
    }
    match answering {
        Some(now) => {
            assert!(now.to_string().contains("survives"), "the running service lost its memory: {now}");
            assert_eq!(now["cold_started_at"], before["cold_started_at"], "it is the same process");
            if is_gone(supervisor) {
                // Orphaned, as after any supervisor crash: start says so; the test ends the tree.
                let refused = env.run(&["start", name]);
                assert!(!refused.status.success(), "a second copy was started beside the orphan");
                verified_signal(init, &["__ns-init", &state], Signal::SIGKILL);
                wait_for("the orphan to be gone", || is_gone(init).then_some(()));
            } else {
                env.ok(&["stop", name, "--no-checkpoint"]);
            }
        }
        None => {
            assert!(!checkpoints.is_empty(), "the service is gone and no checkpoint holds its memory");
            wait_for("status to see the stop", || (env.status(name)["state"] != "running").then_some(()));
            let started = env.start(name);
            assert_eq!(started["started_from"], "checkpoint", "{started}");
            let after = wait_for("the restored service", || http_json(http_port));
            assert!(after.to_string().contains("survives"), "the checkpoint lost the memory: {after}");
            assert_eq!(after["cold_started_at"], before["cold_started_at"]);
            env.ok(&["stop", name, "--no-checkpoint"]);
        }
    }
}

#[test]
fn criu_killed_after_pre_dump() {
    interrupted_stop("pre-dump", "criu");
}

#[test]
fn criu_killed_after_post_dump() {
    interrupted_stop("post-dump", "criu");
}

#[test]
fn supervisor_killed_after_pre_dump() {
    interrupted_stop("pre-dump", "supervisor");
}

#[test]
fn supervisor_killed_after_post_dump() {
    interrupted_stop("post-dump", "supervisor");
}
