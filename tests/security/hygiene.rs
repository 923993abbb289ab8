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
