//! Service files are trusted only when root's: whoever can write a service file, its directory
//! or the CRIU config it selects must not become root through it, nor through `user: root` or
//! a CRIU option spelled so a denylist misses it.

use super::common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown_to(p: &Path, user: &str) {
    nix::unistd::chown(p, Some(nix::unistd::Uid::from_raw(uid_of_user(user))), None).unwrap();
}

/// `stasis ARGS` fails with the config error code, and its output (stderr and stdout, where
/// `validate` reports) holds every one of `needles`.
fn refused(env: &Env, args: &[&str], needles: &[&str]) {
    let out = env.run(args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(3), "stasis {args:?} is refused as a config error: {text}");
    for n in needles {
        assert!(text.contains(n), "stasis {args:?} says {n:?}: {text}");
    }
}

fn plain(kill_port: u16) -> String {
    format!("command: [\"/bin/sleep\", \"100\"]\nuser: nobody\nkill_port: {kill_port}\n")
}

#[test]
fn a_service_file_anyone_may_write_is_refused_with_the_fix() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let file = env.write_service("open", &plain(kill));
    env.ok(&["validate", "open"]);
    chmod(&file, 0o666);
    let f = file.display().to_string();
    refused(&env, &["validate", "open"], &[&f, &format!("chmod go-w {f}")]);
    // Every command that loads it refuses it too; nothing is started.
    refused(&env, &["start", "open"], &[&format!("chmod go-w {f}")]);
    refused(&env, &["stop", "open"], &[&format!("chmod go-w {f}")]);
    chmod(&file, 0o644);
    env.ok(&["validate", "open"]);
}

#[test]
fn a_service_file_owned_by_the_service_user_is_refused_with_the_fix() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let file = env.write_service("theirs", &plain(kill));
    chown_to(&file, "stasis-example");
    let f = file.display().to_string();
    refused(&env, &["validate", "theirs"], &[&format!("owned by uid {}", uid_of_user("stasis-example"))]);
    refused(&env, &["start", "theirs"], &[&format!("chown root:root {f}")]);
    // `validate` with no names goes through the same check.
    refused(&env, &["validate"], &[&format!("chown root:root {f}")]);
}

#[test]
fn a_symlinked_service_file_is_refused() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let real = env.path().join("real.yaml");
    std::fs::write(&real, plain(kill)).unwrap();
    std::os::unix::fs::symlink(&real, env.path().join("conf/linked.yaml")).unwrap();
    refused(&env, &["validate", "linked"], &["symbolic link"]);
}

#[test]
fn a_group_writable_config_dir_is_refused_with_the_fix() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    env.write_service("indir", &plain(kill));
    let conf = env.path().join("conf").canonicalize().unwrap();
    chmod(&conf, 0o775);
    let d = conf.display().to_string();
    refused(&env, &["validate", "indir"], &[&d, "its group", &format!("chmod go-w {d}")]);
    refused(&env, &["start", "indir"], &[&format!("chmod go-w {d}")]);
    chmod(&conf, 0o755);
    env.ok(&["validate", "indir"]);
}

/// A copy of the repository's CRIU configs in `dir`, used by every later command of `env`.
fn own_criu_configs(env: &Env, dir: &Path) {
    std::fs::create_dir(dir).unwrap();
    for name in ["default.conf", "tcp-close.conf"] {
        std::fs::copy(Path::new(REPO).join("criu-configs").join(name), dir.join(name)).unwrap();
    }
    env.use_criu_configs(dir);
}

#[test]
fn a_criu_config_dir_or_file_not_roots_alone_is_refused_with_the_fix() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let dir = env.path().join("criu-configs");
    own_criu_configs(&env, &dir);
    env.write_service("criu-dir", &plain(kill));
    env.ok(&["validate", "criu-dir"]);
    chown_to(&dir, "stasis-example");
    let canonical = dir.canonicalize().unwrap().display().to_string();
    refused(&env, &["validate", "criu-dir"], &["key `criu.config`", &format!("chown root:root {canonical}")]);
    refused(&env, &["start", "criu-dir"], &[&format!("chown root:root {canonical}")]);
    chown_to(&dir, "root");
    let conf = dir.join("default.conf");
    chmod(&conf, 0o646);
    refused(&env, &["validate", "criu-dir"], &["everyone", &format!("chmod go-w {}", conf.display())]);
    chmod(&conf, 0o644);
    env.ok(&["validate", "criu-dir"]);
}

#[test]
fn a_criu_config_file_is_held_to_the_same_allowlist() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    let dir = env.path().join("criu-configs");
    own_criu_configs(&env, &dir);
    let default = std::fs::read_to_string(dir.join("default.conf")).unwrap();
    for (profile, line, canonical) in [
        ("script", "action-script /tmp/x.sh", "--action-script"),
        ("abbrev", "action-scr /tmp/x.sh", "--action-script"),
        ("attached", "lib=/tmp", "--libdir"),
        ("tree", "tre 1", "--tree"),
        ("exec", "exec-cmd", "--exec-cmd"),
    ] {
        std::fs::write(dir.join(format!("{profile}.conf")), format!("{default}{line}\n")).unwrap();
        env.write_service(profile, &format!("{}criu:\n  config: {profile}\n", plain(kill)));
        let lines = default.lines().count() + 1;
        refused(&env, &["validate", profile], &["key `criu.config`", &format!("line {lines}"), canonical]);
    }
    // The allowed options pass in a config file too.
    std::fs::write(dir.join("tuned.conf"), format!("{default}ghost-limit 4M\nallow-uprobes\n")).unwrap();
    env.write_service("tuned", &format!("{}criu:\n  config: tuned\n", plain(kill)));
    env.ok(&["validate", "tuned"]);
}

#[test]
fn user_root_needs_allow_root() {
    let env = Env::new();
    let [a, b, c] = free_ports::<3>();
    env.write_service("asroot", &format!("command: [\"/bin/sleep\", \"100\"]\nuser: root\nkill_port: {a}\n"));
    refused(&env, &["validate", "asroot"], &["key `user`", "uid 0", "allow_root: true"]);
    refused(&env, &["start", "asroot"], &["allow_root: true"]);
    // By id, not by name: a group that is gid 0 under any name.
    let root_group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(0)).unwrap().unwrap().name;
    env.write_service(
        "rootgroup",
        &format!("command: [\"/bin/sleep\", \"100\"]\nuser: nobody\ngroup: {root_group}\nkill_port: {b}\n"),
    );
    refused(&env, &["validate", "rootgroup"], &["key `group`", "gid 0"]);
    env.write_service(
        "allowed",
        &format!("command: [\"/bin/sleep\", \"100\"]\nuser: root\nallow_root: true\nkill_port: {c}\n"),
    );
    env.ok(&["validate", "allowed"]);
}

#[test]
fn every_spelling_of_a_dangerous_criu_option_is_refused() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    // (the entries, in YAML, and the option CRIU would have taken them for)
    let cases: &[(&str, &str)] = &[
        ("[\"--action-scr=/tmp/x.sh\"]", "--action-script"),
        ("[\"--action-script\", \"/tmp/x.sh\"]", "--action-script"),
        ("[\"--lib=/tmp\"]", "--libdir"),
        ("[\"-L/tmp\"]", "--libdir"),
        ("[\"-D/tmp\"]", "--images-dir"),
        ("[\"-o/tmp/log\"]", "--log-file"),
        ("[\"--tre=1\"]", "--tree"),
        ("[\"-t\", \"1\"]", "--tree"),
        ("[\"--exec-cmd\"]", "--exec-cmd"),
        ("[\"--root=\"]", "--root"),
        ("[\"-lD/tmp\"]", "--images-dir"),
        ("[\"-vD/tmp\"]", "--verbosity"),
        ("[\"--pid=/tmp/p\"]", "--pidfile"),
        ("[\"--tcp-\"]", "ambiguous"),
        ("[\"--ghost-limit\", \"--config=/tmp/c\"]", "another config file"),
        ("[\"--ghost-limit\"]", "needs a value"),
        ("[\"--network-lock=iptables\"]", "use one of"),
        ("[\"restore\"]", "not an option"),
    ];
    for (i, (options, expect)) in cases.iter().enumerate() {
        let name = format!("opt{i}");
        env.write_service(&name, &format!("{}criu:\n  options: {options}\n", plain(kill)));
        refused(&env, &["validate", &name], &["key `criu.options[", expect]);
    }
    for (i, options) in [
        "[\"--tcp-close\"]",
        "[\"--tcp-clo\"]",
        "[\"--ghost-limit\", \"4M\"]",
        "[\"--ghost-limit=1048576\"]",
        "[\"--network-lock\", \"skip\"]",
        "[\"--allow-uprobes\", \"--skip-in-flight\", \"-l\", \"--no-link-remap\"]",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("good{i}");
        env.write_service(&name, &format!("{}criu:\n  options: {options}\n", plain(kill)));
        env.ok(&["validate", &name]);
    }
}

#[test]
fn a_host_config_not_roots_alone_is_refused() {
    let env = Env::new();
    let [kill] = free_ports::<1>();
    env.write_service("hosted", &plain(kill));
    let host = env.path().join("stasis.yaml");
    std::fs::write(&host, "max_concurrent_dumps: 1\n").unwrap();
    chown_to(&host, "stasis-example");
    let out = env.run(&["start", "hosted"]);
    env.adopt("hosted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains(&format!("chown root:root {}", host.display())), "{err}");
}
