//! Breadth: common daemon patterns work with the plain service file (the defaults in
//! criu-configs/), and a dump that fails for a known reason says which file or socket and the
//! option that fixes it.
//!
//! Every port is picked free at run time (`free_ports`).

mod common;
use common::*;

/// A service that keeps a file open after its name was removed (another name remains), and
/// serves what it reads through that open file.
fn unlinked_yaml(kill_port: u16, http: u16, dir: &std::path::Path) -> String {
    let script = format!(
        "import http.server, os\\n\
         a, b = '{d}/state', '{d}/state.keep'\\n\
         open(a, 'w').write('payload')\\n\
         os.link(a, b)\\n\
         f = open(a)\\n\
         os.unlink(a)\\n\
         class H(http.server.BaseHTTPRequestHandler):\\n\
         \\x20   def do_GET(self):\\n\
         \\x20       f.seek(0); body = f.read().encode()\\n\
         \\x20       self.send_response(200); self.end_headers(); self.wfile.write(body)\\n\
         \\x20   def log_message(self, *a):\\n\
         \\x20       pass\\n\
         http.server.HTTPServer(('127.0.0.1', {http}), H).serve_forever()\\n",
        d = dir.display()
    );
    format!("command: [\"/usr/bin/python3\", \"-c\", \"{script}\"]\nuser: stasis-example\nkill_port: {kill_port}\n")
}

/// A directory for the service's files, owned by its user.
fn service_dir_for(env: &Env, name: &str, user: &str) -> std::path::PathBuf {
    let dir = env.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(uid_of_user(user))), None).unwrap();
    dir
}

fn service_dir(env: &Env, name: &str) -> std::path::PathBuf {
    service_dir_for(env, name, "stasis-example")
}

#[test]
fn a_file_open_after_its_name_was_removed_survives_stop_and_start_with_the_defaults() {
    let env = Env::new();
    let dir = service_dir(&env, "remapped");
    let [kill, http_port] = free_ports::<2>();
    env.write_service("remapped", &unlinked_yaml(kill, http_port, &dir));
    env.start("remapped");
    wait_for("the service", || http(http_port, "GET", "/", "").filter(|b| b == "payload"));
    // doctor: a dump would work; it is thrown away, the service untouched.
    let pid = env.status("remapped")["pid"].as_i64().unwrap();
    let out = env.ok(&["doctor", "remapped"]);
    assert!(out.lines().last().unwrap().starts_with("OK it can be checkpointed now"), "{out}");
    assert!(env.checkpoint_dirs("remapped").is_empty(), "a dry run keeps nothing");
    assert_eq!(env.status("remapped")["pid"].as_i64().unwrap(), pid);
    env.ok(&["stop", "remapped"]);
    let back = env.start("remapped");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    assert_eq!(http(http_port, "GET", "/", "").as_deref(), Some("payload"), "still reads through the open file");
    env.ok(&["stop", "remapped"]);
    env.start("remapped");
    env.ok(&["stop", "remapped"]);
}

#[test]
fn without_link_remap_the_failed_dump_names_the_file_and_the_option() {
    let env = Env::new();
    // The repository's configs, less link-remap.
    let configs = env.path().join("criu-configs");
    std::fs::create_dir(&configs).unwrap();
    let default = std::fs::read_to_string(std::path::Path::new(REPO).join("criu-configs/default.conf")).unwrap();
    let without: String = default.lines().filter(|l| l.trim() != "link-remap").map(|l| format!("{l}\n")).collect();
    assert_ne!(without, default, "the default config has link-remap");
    std::fs::write(configs.join("default.conf"), without).unwrap();
    env.use_criu_configs(&configs);
    let dir = service_dir(&env, "unremapped");
    let [kill, http_port] = free_ports::<2>();
    env.write_service("unremapped", &unlinked_yaml(kill, http_port, &dir));
    env.start("unremapped");
    wait_for("the service", || http(http_port, "GET", "/", "").filter(|b| b == "payload"));
    let state = format!("{}/state", dir.display());
    // doctor says so without stopping anything.
    let out = env.run(&["doctor", "unremapped"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains(&format!("{state} is open but its name was removed")) && err.contains("add --link-remap"),
        "{err}"
    );
    assert!(env.checkpoint_dirs("unremapped").is_empty());
    assert_eq!(http(http_port, "GET", "/", "").as_deref(), Some("payload"), "untouched");
    let out = env.run(&["stop", "unremapped"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains(&format!("{state} is open but its name was removed")), "names the file: {err}");
    assert!(err.contains("add --link-remap to criu.options"), "and the fix: {err}");
    assert_eq!(http(http_port, "GET", "/", "").as_deref(), Some("payload"), "the service keeps running");
}

/// One request on a plain TCP text protocol (memcached's): what the server answered.
fn ask(port: u16, request: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    s.write_all(b"quit\r\n").ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Some(out)
}

#[test]
fn memcached_keeps_its_items_across_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    env.write_service(
        "cache",
        &format!("command: [\"/usr/bin/memcached\", \"-p\", \"{port}\", \"-l\", \"127.0.0.1\", \"-U\", \"0\", \"-m\", \"64\"]\nuser: memcache\nkill_port: {kill}\n"),
    );
    env.start("cache");
    wait_for("memcached", || ask(port, "version\r\n").filter(|r| r.starts_with("VERSION")));
    assert!(ask(port, "set warm 0 0 5\r\nhello\r\n").unwrap().contains("STORED"));
    env.ok(&["stop", "cache"]);
    let back = env.start("cache");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    assert!(ask(port, "get warm\r\n").unwrap().contains("VALUE warm 0 5\r\nhello"), "the item came back");
    env.ok(&["stop", "cache"]);
}

#[test]
fn nginx_with_a_master_and_two_workers_serves_after_stop_and_start() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    let dir = service_dir_for(&env, "web", "www-data");
    std::fs::create_dir(dir.join("html")).unwrap();
    std::fs::write(dir.join("html/index.html"), "served by nginx\n").unwrap();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log stderr;\nevents {{ worker_connections 64; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  server {{ listen 127.0.0.1:{http_port}; root {d}/html; }}\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    env.write_service(
        "web",
        &format!(
            "command: [\"/usr/sbin/nginx\", \"-c\", \"{}/nginx.conf\", \"-e\", \"stderr\"]\nuser: www-data\nkill_port: {kill}\n",
            dir.display()
        ),
    );
    env.start("web");
    wait_for("nginx", || http(http_port, "GET", "/", "").filter(|b| b == "served by nginx\n"));
    env.ok(&["stop", "web"]);
    let back = env.start("web");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    assert_eq!(http(http_port, "GET", "/", "").as_deref(), Some("served by nginx\n"));
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "web", "--json"])).unwrap();
    let workers = v["processes"].as_array().unwrap().iter().filter(|p| p["comm"] == "nginx").count();
    assert_eq!(workers, 3, "the master and its two workers, all restored: {v}");
    env.ok(&["stop", "web"]);
}
