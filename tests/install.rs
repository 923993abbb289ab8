//! Setting services up and installing stasis: `add`/`remove`, the LSB init script whose stop is
//! the kill port, the install layout, and upgrades that keep checkpoints restorable.

mod common;
use common::*;
use std::process::Command;

#[test]
fn add_writes_a_valid_service_and_creates_its_user_and_dirs() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    let user = "stasis-t-add";
    let _ = Command::new("userdel").arg(user).status();
    struct DelUser(&'static str);
    impl Drop for DelUser {
        fn drop(&mut self) {
            let _ = Command::new("userdel").arg(self.0).status();
        }
    }
    let _cleanup = DelUser(user);
    let out = env.ok(&[
        "add",
        "adder",
        "--user",
        user,
        "--create-user",
        "--kill-port",
        &kill.to_string(),
        "--env",
        &format!("NOTES_PORT={http_port}"),
        "--",
        "/usr/bin/python3",
        &format!("{REPO}/examples/notes/notes.py"),
    ]);
    assert!(out.contains("wrote ") && out.contains("next: "), "{out}");
    let passwd = nix::unistd::User::from_name(user).unwrap().expect("user created");
    assert_eq!(passwd.shell.to_str(), Some("/usr/sbin/nologin"));
    let work = env.state_dir().join("work/adder");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&work).unwrap().uid(), passwd.uid.as_raw(), "working dir owned by the user");
    env.ok(&["validate", "adder"]);
    let again = env.run(&["add", "adder", "--user", user, "--kill-port", &kill.to_string(), "--", "/bin/true"]);
    assert_eq!(again.status.code(), Some(3), "an existing file is not replaced without --force");

    env.start("adder");
    let st = wait_for("service", || http_json(http_port));
    assert_eq!(st["uid"], passwd.uid.as_raw());
    env.ok(&["stop", "adder"]);
    assert_eq!(env.checkpoint_dirs("adder").len(), 1);

    let out = env.ok(&["remove", "adder"]);
    assert!(out.contains("kept checkpoints"), "{out}");
    assert!(!env.path().join("conf/adder.yaml").exists());
    assert_eq!(env.checkpoint_dirs("adder").len(), 1, "remove keeps checkpoints");
    env.ok(&["remove", "adder", "--purge"]);
    assert!(!env.service_dir("adder").exists() && !work.exists(), "--purge deletes them");
}

#[test]
fn the_init_script_starts_restores_and_stops_through_the_kill_port() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("lsb", &notes_yaml(kill, http_port, ""));
    let script = env.path().join("stasis-lsb");
    std::fs::write(&script, env.ok(&["init-script", "lsb"])).unwrap();
    let sh = |arg: &str| {
        let out = Command::new("sh").arg(&script).arg(arg).output().unwrap();
        eprintln!(
            "init script {arg}: {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    assert!(sh("start").status.success());
    let _guard = StartedGuard(&env, "lsb");
    assert_eq!(sh("status").status.code(), Some(0), "LSB status: 0 while running");
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "from init.d").unwrap();
    let stop = sh("stop");
    assert!(stop.status.success());
    assert!(String::from_utf8_lossy(&stop.stdout).contains("OK checkpoint"));
    assert_eq!(sh("status").status.code(), Some(3), "LSB status: 3 when stopped");
    assert!(sh("start").status.success());
    let st = wait_for("restored", || http_json(http_port));
    assert_eq!(st["notes"], serde_json::json!(["from init.d"]));
    assert!(sh("stop").status.success());
}

/// Kills what a test started outside `Env::start` (here: through the init script).
struct StartedGuard<'a>(&'a Env, &'a str);
impl Drop for StartedGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.cmd(&["stop", self.1]).output();
    }
}

#[test]
fn an_upgraded_binary_restores_checkpoints_of_the_old_one() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("upgrade", &notes_yaml(kill, http_port, ""));
    // "Old" and "new" stasis: the same program, but different files (different content).
    let old = env.path().join("stasis-old");
    let new = env.path().join("stasis-new");
    std::fs::copy(BIN, &old).unwrap();
    let mut bytes = std::fs::read(BIN).unwrap();
    bytes.extend_from_slice(b"\0upgrade");
    std::fs::write(&new, bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();

    let with = |bin: &std::path::Path, args: &[&str]| {
        let out = env.cmd_with(bin, args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    with(&old, &["start", "upgrade"]);
    let _guard = StartedGuard(&env, "upgrade");
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "before the upgrade").unwrap();
    with(&old, &["stop", "upgrade"]);
    std::fs::remove_file(&old).unwrap();

    let out = with(&new, &["start", "upgrade"]);
    assert!(out.contains("restored from checkpoint"), "the new binary restores the old checkpoint: {out}");
    let st = wait_for("restored", || http_json(http_port));
    assert_eq!(st["notes"], serde_json::json!(["before the upgrade"]));
    with(&new, &["stop", "upgrade"]);
    let out = with(&new, &["start", "upgrade"]);
    assert!(out.contains("restored from checkpoint"), "{out}");
    with(&new, &["stop", "upgrade"]);
}

#[test]
fn install_lays_out_binary_unit_configs_man_pages_and_completions() {
    let env = Env::new();
    let dest = env.path().join("root");
    let out = Command::new("bash")
        .arg(format!("{REPO}/scripts/install"))
        .args(["--destdir"])
        .arg(&dest)
        .args(["--binary", BIN])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in [
        "usr/local/bin/stasis",
        "usr/local/lib/stasis/stasis-init",
        "usr/local/lib/systemd/system/stasis@.service",
        "usr/local/share/stasis/criu-configs/default.conf",
        "usr/local/share/man/man1/stasis.1",
        "usr/local/share/man/man1/stasis-start.1",
        "usr/local/share/bash-completion/completions/stasis",
        "usr/local/share/zsh/site-functions/_stasis",
        "usr/local/share/fish/vendor_completions.d/stasis.fish",
        "etc/stasis/services",
    ] {
        let p = dest.join(f);
        assert!(p.exists(), "{} is installed", p.display());
        if p.is_file() {
            assert!(std::fs::metadata(&p).unwrap().len() > 0, "{} is not empty", p.display());
        }
    }
    let unit = std::fs::read_to_string(dest.join("usr/local/lib/systemd/system/stasis@.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/stasis start %i --foreground"));
    assert!(unit.contains("ExecStop=/usr/local/bin/stasis stop %i"));
    let man = std::fs::read_to_string(dest.join("usr/local/share/man/man1/stasis-start.1")).unwrap();
    assert!(man.contains("foreground"), "man pages come from the CLI definitions");
}

#[test]
fn a_debian_package_has_the_same_layout_under_usr() {
    let env = Env::new();
    let out = Command::new("bash")
        .arg(format!("{REPO}/scripts/package-deb"))
        .args(["--binary", BIN, "--compress", "none", "--out"])
        .arg(env.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deb = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let info = Command::new("dpkg-deb").args(["-f", &deb, "Package", "Depends"]).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("Package: stasis") && info.contains("nftables"), "{info}");
    let listing = Command::new("dpkg-deb").args(["-c", &deb]).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for f in [
        "./usr/bin/stasis",
        "./usr/lib/systemd/system/stasis@.service",
        "./usr/share/stasis/criu-configs/default.conf",
        "./usr/share/man/man1/stasis.1",
    ] {
        assert!(listing.contains(f), "{f} in the package:\n{listing}");
    }
    let unit = Command::new("sh")
        .arg("-c")
        .arg(format!("dpkg-deb --fsys-tarfile {deb} | tar -xO ./usr/lib/systemd/system/stasis@.service"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&unit.stdout).contains("ExecStart=/usr/bin/stasis start %i --foreground"));
}
