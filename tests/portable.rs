//! Portable checkpoints: `export` writes one checksummed archive, `import` checks all of it and
//! adds it as the newest checkpoint, and a host that has the same binaries at the same paths
//! restores it: here a second network namespace with its own loopback stands for that host.
//! Every port is picked free at run time.

mod common;
use common::*;
use std::process::Command;

fn redis_yaml(port: u16, kill_port: u16) -> String {
    format!(
        "command: [\"/usr/bin/redis-server\", \"--port\", \"{port}\", \"--bind\", \"127.0.0.1\", \"--save\", \"\", \"--appendonly\", \"no\"]\nuser: redis\nkill_port: {kill_port}\n"
    )
}

/// A network namespace of this test's, deleted at the end.
struct OtherHost {
    name: String,
}

impl OtherHost {
    fn new() -> OtherHost {
        let name = format!("stasis-test-{}", std::process::id());
        let ok = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
        assert!(ok(&["netns", "add", &name]), "ip netns add {name}");
        assert!(ok(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]));
        OtherHost { name }
    }

    /// `stasis ARGS` run inside the namespace, with the env's directories.
    fn stasis(&self, env: &Env, args: &[&str]) -> std::process::Output {
        let c = env.cmd(args);
        let mut ip = Command::new("ip");
        ip.args(["netns", "exec", &self.name, BIN]).args(args);
        for (k, v) in c.get_envs() {
            if let Some(v) = v {
                ip.env(k, v);
            }
        }
        logged(args, ip)
    }

    fn redis_cli(&self, port: u16, args: &[&str]) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "redis-cli", "-p", &port.to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for OtherHost {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

#[test]
fn an_exported_checkpoint_restores_on_another_host_with_its_data_and_port() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("mover", &redis_yaml(port, kill));
    env.start("mover");
    wait_for("redis", || redis_cli(port, &["PING"]).filter(|r| r == "PONG"));
    redis_cli(port, &["SET", "warm", "from-host-a"]).unwrap();
    env.ok(&["stop", "mover"]);
    let archive = env.path().join("mover.tar.zst");
    let out = env.ok(&["export", "mover", "-o", &archive.display().to_string()]);
    assert!(out.contains("exported checkpoint") && out.contains("of mover"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&archive).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the archive holds the service's memory: root only");

    // Host A is gone: its state with it (its lock table too, as the checkpoint will never be
    // restored there). Host B has the same binaries and paths, its own network.
    release_criu_tables(&env.state_dir());
    std::fs::remove_dir_all(env.state_dir()).unwrap();
    let b = OtherHost::new();
    let imported = b.stasis(&env, &["import", &archive.display().to_string(), "--json"]);
    assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));
    let v: serde_json::Value = serde_json::from_slice(&imported.stdout).unwrap();
    assert_eq!(v["name"], "mover");
    env.adopt("mover");
    let started = b.stasis(&env, &["start", "mover", "--json"]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let s: serde_json::Value = serde_json::from_slice(&started.stdout).unwrap();
    assert_eq!(s["started_from"], "checkpoint", "{s}");
    assert_eq!(s["checkpoint"], v["checkpoint"], "{s}");
    wait_for("redis on host B", || b.redis_cli(port, &["PING"]).filter(|r| r == "PONG"));
    assert_eq!(b.redis_cli(port, &["GET", "warm"]).as_deref(), Some("from-host-a"), "the data came along");
    assert!(redis_cli(port, &["PING"]).is_none(), "and the port is host B's, not host A's");
    let stopped = b.stasis(&env, &["stop", "mover"]);
    assert!(stopped.status.success(), "{}", String::from_utf8_lossy(&stopped.stderr));
}

#[test]
fn a_bit_flip_anywhere_in_the_archive_is_refused_and_nothing_is_added() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("flip", &redis_yaml(port, kill));
    env.start("flip");
    wait_for("redis", || redis_cli(port, &["PING"]).filter(|r| r == "PONG"));
    env.ok(&["stop", "flip"]);
    let good = env.path().join("flip.tar.zst");
    env.ok(&["export", "flip", "-o", &good.display().to_string()]);
    let bytes = std::fs::read(&good).unwrap();
    let before = env.checkpoint_dirs("flip").len();
    // Near the start (header, manifest), in the middle (images), near the end (checksum).
    for at in [40, bytes.len() / 2, bytes.len() - 6] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x20;
        let path = env.path().join(format!("bad-{at}.tar.zst"));
        std::fs::write(&path, &bad).unwrap();
        let out = env.run(&["import", &path.display().to_string()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(11), "byte {at}: {err}");
        assert!(
            err.contains("failed to import") && err.contains("damaged") && err.contains("nothing was added"),
            "byte {at}: {err}"
        );
    }
    let junk = env.path().join("junk");
    std::fs::write(&junk, b"definitely not an archive").unwrap();
    let out = env.run(&["import", &junk.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(11), "{err}");
    assert!(err.contains("not a stasis export"), "{err}");
    assert_eq!(env.checkpoint_dirs("flip").len(), before, "no checkpoint added");
    let staged: Vec<_> = std::fs::read_dir(env.state_dir().join("import")).unwrap().collect();
    assert!(staged.is_empty(), "nothing left in staging: {staged:?}");
    release_criu_tables(&env.state_dir());
}

#[test]
fn export_streams_through_a_pipe_into_import_as_another_service() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    // The copy has the source's ports: it is restored from the source's checkpoint.
    env.write_service("source", &redis_yaml(port, kill));
    env.write_service("copy", &redis_yaml(port, kill));
    env.start("source");
    wait_for("redis", || redis_cli(port, &["PING"]).filter(|r| r == "PONG"));
    redis_cli(port, &["SET", "k", "v"]).unwrap();
    env.ok(&["stop", "source"]);
    let export = env.cmd(&["export", "source", "-o", "-"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let import = env.cmd(&["import", "-", "--as", "copy", "--json"]).stdin(export.stdout.unwrap()).output().unwrap();
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    let v: serde_json::Value = serde_json::from_slice(&import.stdout).unwrap();
    assert_eq!(v["name"], "copy");
    assert_eq!(v["imported_from"]["service"], "source");
    // The copy restores with the data (the source is stopped, so the port is free).
    let s = env.start("copy");
    assert_eq!(s["started_from"], "checkpoint", "{s}");
    assert_eq!(redis_cli(port, &["GET", "k"]).as_deref(), Some("v"));
    env.ok(&["stop", "copy"]);
    release_criu_tables(&env.state_dir());
}

/// About `n` x 1000 bytes of values, through one pipe.
fn load_values(port: u16, n: usize, value: &str) {
    let mut load = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--pipe"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(load.stdin.take().unwrap());
        for i in 0..n {
            write!(w, "SET k:{i} {value}\r\n").unwrap();
        }
    }
    assert!(load.wait().unwrap().success());
}

#[test]
fn a_compressed_checkpoint_of_repetitive_memory_is_under_half_of_it_and_restores() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("squeezed", &format!("{}compression: zstd\n", redis_yaml(port, kill)));
    env.start("squeezed");
    wait_for("redis", || redis_cli(port, &["PING"]).filter(|r| r == "PONG"));
    load_values(port, 50_000, &"abcdefgh".repeat(125));
    env.ok(&["stop", "squeezed"]);
    let cp = env.checkpoint_dirs("squeezed").pop().unwrap();
    let names: Vec<String> = std::fs::read_dir(cp.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("pages-") && n.ends_with(".img.zst")), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("pages-") && n.ends_with(".img")), "no plain pages at rest: {names:?}");
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "squeezed", "--json"])).unwrap();
    let memory = v["memory"]["total"].as_u64().unwrap();
    let size = v["size_bytes"].as_u64().unwrap();
    assert!(memory > 50 << 20, "{memory}");
    assert!(size * 2 < memory, "checkpoint {size} bytes is under half of the {memory} bytes of memory it holds");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(cp.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["compression"]["algorithm"], "zstd");
    let back = env.start("squeezed");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    assert_eq!(redis_cli(port, &["DBSIZE"]).as_deref(), Some("50000"));
    assert!(!cp.join(".restore-images").exists(), "the plain copy is gone after the restore");
    env.ok(&["stop", "squeezed"]);
}

#[test]
fn inspect_reads_the_images_the_port_the_process_and_the_memory() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service("looked", &redis_yaml(port, kill));
    env.start("looked");
    wait_for("redis", || redis_cli(port, &["PING"]).filter(|r| r == "PONG"));
    // About 100 MiB of values, so the libraries' pages (not saved) are a small part of the RSS.
    load_values(port, 100_000, &"x".repeat(1000));
    let pid = env.status("looked")["pid"].as_i64().unwrap();
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok()))
        .unwrap()
        * 1024;
    env.ok(&["checkpoint", "looked"]);
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "looked", "--json"])).unwrap();
    let procs = v["processes"].as_array().unwrap();
    let redis = procs.iter().find(|p| p["comm"] == "redis-server").unwrap_or_else(|| panic!("no redis-server in {v}"));
    assert_eq!(redis["uid"], uid_of_user("redis"), "{redis}");
    assert!(redis["command_line"][0].as_str().unwrap().contains("redis-server"), "{redis}");
    assert!(
        v["sockets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["state"] == "listening" && s["local"] == format!("127.0.0.1:{port}")),
        "{v}"
    );
    let saved = v["memory"]["total"].as_u64().unwrap();
    let off = (saved as f64 - rss as f64).abs() / rss as f64;
    assert!(off < 0.10, "memory saved {saved} within 10% of the RSS {rss} ({:.1}%)", off * 100.0);
    assert!(v["memory"]["anonymous"].as_u64().unwrap() > saved / 2, "{}", v["memory"]);
    assert_eq!(v["fits_programs_on_disk"], true, "{v}");
    assert_eq!(v["criu_version"], v["host"]["criu_version"]);
    assert!(v["namespaces"]["pid"].as_u64().is_some(), "its own PID namespace: {}", v["namespaces"]);
    // The human form says the same in words.
    let text = env.ok(&["inspect", "looked"]);
    assert!(text.contains(&format!("tcp listening 127.0.0.1:{port}")) && text.contains("redis-server"), "{text}");
    env.ok(&["stop", "looked"]);
}

/// Whether `needle` occurs in any file under `dir`.
fn found_under(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().filter_map(Result::ok).any(|e| {
        let p = e.path();
        if p.is_dir() {
            found_under(&p, needle)
        } else {
            std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        }
    })
}

#[test]
fn an_encrypted_checkpoint_holds_no_plaintext_memory_and_a_wrong_key_is_refused_but_kept() {
    let env = Env::new();
    let [plain_kill, plain_port, vault_kill, vault_port] = free_ports::<4>();
    let keys = env.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let key = keys.join("vault.key");
    let write_key = |bytes: &[u8]| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&key, bytes).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    let mut good = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut good).unwrap();
    write_key(&good);
    let secret = format!("TOPSECRET-{}", std::process::id());
    // The control: the same service without encryption shows the secret in its images, so the
    // search below can fail.
    env.write_service("plain", &redis_yaml(plain_port, plain_kill));
    env.write_service(
        "vault",
        &format!("{}encryption_key_file: {}\ncompression: zstd\n", redis_yaml(vault_port, vault_kill), key.display()),
    );
    for (name, port) in [("plain", plain_port), ("vault", vault_port)] {
        env.start(name);
        wait_for("redis", || redis_cli(port, &["PING"]).filter(|r| r == "PONG"));
        redis_cli(port, &["SET", "secret", &secret]).unwrap();
        env.ok(&["stop", name]);
    }
    assert!(found_under(&env.service_dir("plain").join("checkpoints"), secret.as_bytes()), "the control finds it");
    let vault = env.service_dir("vault");
    assert!(!found_under(&vault, secret.as_bytes()), "no plaintext of the secret anywhere in the service's state");
    let cp = env.checkpoint_dirs("vault").pop().unwrap();
    let m = std::fs::read_to_string(cp.join("manifest.json")).unwrap();
    assert!(
        m.contains("xchacha20poly1305") && !m.contains(&format!("{:02x}{:02x}{:02x}", good[0], good[1], good[2])),
        "the key id, not the key: {m}"
    );
    // The right key brings it back.
    let back = env.start("vault");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    assert_eq!(redis_cli(vault_port, &["GET", "secret"]).as_deref(), Some(secret.as_str()));
    let looked: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "vault", "--json"])).unwrap();
    assert!(
        looked["sockets"].as_array().unwrap().iter().any(|s| s["local"] == format!("127.0.0.1:{vault_port}")),
        "{looked}"
    );
    env.ok(&["stop", "vault"]);
    // A wrong key: a clear error, the checkpoint kept and not quarantined.
    let before = env.checkpoint_dirs("vault");
    write_key(&[7u8; 32]);
    let out = env.run(&["start", "vault"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("the wrong key") && err.contains("not quarantined"), "{err}");
    assert_eq!(env.checkpoint_dirs("vault"), before, "kept where it was");
    write_key(&good);
    let again = env.start("vault");
    assert_eq!(again["started_from"], "checkpoint", "{again}");
    assert_eq!(redis_cli(vault_port, &["GET", "secret"]).as_deref(), Some(secret.as_str()));
    env.ok(&["stop", "vault"]);
    release_criu_tables(&env.state_dir());
}
