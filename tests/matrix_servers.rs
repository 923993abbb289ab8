//! Compatibility matrix, servers: a database (PostgreSQL 15) and a message broker (mosquitto),
//! each checkpointed and restored through stasis with the plain service file (no `criu:`
//! section), each checked to come back as the same running program with its state.
//!
//! Every port is picked free at run time.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A directory under the test's temp dir, owned by `user`.
fn owned_dir(env: &Env, name: &str, user: &str) -> PathBuf {
    let dir = env.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let uid = nix::unistd::Uid::from_raw(uid_of_user(user));
    nix::unistd::chown(&dir, Some(uid), None).unwrap();
    dir
}

/// `psql` against the test cluster over TCP: its output (unaligned, tuples only), trimmed,
/// when it succeeded.
fn psql(port: u16, sql: &str) -> Option<String> {
    let out = Command::new(format!("{PG_BIN}/psql"))
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .args(["-p", &port.to_string(), "-c", sql])
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A fresh cluster owned by `postgres` in `dir/data`, reachable over 127.0.0.1 without a password.
fn initdb(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{PG_BIN}/initdb"), "--no-sync", "--no-instructions"])
        .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "-D"])
        .arg(&data)
        .output()
        .expect("run initdb");
    assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(data.join("pg_hba.conf"), "local all all trust\nhost all all 127.0.0.1/32 trust\n").unwrap();
    data
}

/// The files under /dev/shm that a process maps (PostgreSQL's dynamic shared memory segments).
fn dev_shm_maps(pid: i32) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut v: Vec<PathBuf> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.starts_with("/dev/shm/PostgreSQL."))
        .map(PathBuf::from)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// PostgreSQL's dynamic shared memory segments (/dev/shm/PostgreSQL.N) that the service's
/// processes were seen to map: a killed tree leaves them there, so they are removed at the end
/// (looked for once more then, in case the test ends early with the service running).
struct ShmSegments<'a> {
    env: &'a Env,
    name: &'a str,
    seen: std::cell::RefCell<Vec<PathBuf>>,
}

impl ShmSegments<'_> {
    fn note(&self) {
        let mut v = self.seen.borrow_mut();
        v.extend(service_tree(self.env, self.name).into_iter().flat_map(dev_shm_maps));
        v.sort();
        v.dedup();
    }
}

impl Drop for ShmSegments<'_> {
    fn drop(&mut self) {
        self.note();
        for f in self.seen.borrow().iter() {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// The host pids of the service's running processes: its namespace init and every descendant.
fn service_tree(env: &Env, name: &str) -> Vec<i32> {
    let status = env.run(&["status", name, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_default();
    let Some(init) = pid_in(&status["init_pid"]) else { return vec![] };
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut tree = vec![init];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// A client process of the test's own, killed and reaped when the test ends, however it ends.
struct Client(std::process::Child);

impl Drop for Client {
    fn drop(&mut self) {
        // The Child is not reaped yet, so its pid cannot have been reused.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child's stdout, line by line, with a timeout.
struct Lines(std::sync::mpsc::Receiver<String>);

impl Lines {
    fn of(child: &mut std::process::Child) -> Lines {
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines(rx)
    }

    fn next(&self) -> Option<String> {
        self.within(std::time::Duration::from_secs(20))
    }

    fn within(&self, timeout: std::time::Duration) -> Option<String> {
        self.0.recv_timeout(timeout).ok()
    }
}

#[test]
fn postgresql_keeps_its_rows_and_its_running_server_across_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let dir = owned_dir(&env, "pg", "postgres");
    let data = initdb(&dir);
    let sock = owned_dir(&env, "pg/sock", "postgres");
    env.write_service(
        "pg",
        &format!(
            "command: [\"{PG_BIN}/postgres\", \"-D\", \"{}\", \"-p\", \"{port}\", \"-k\", \"{}\", \"-c\", \"listen_addresses=127.0.0.1\"]\nuser: postgres\nkill_port: {kill}\n",
            data.display(),
            sock.display()
        ),
    );
    let shm = ShmSegments { env: &env, name: "pg", seen: Default::default() };
    env.start("pg");
    wait_for("postgres", || psql(port, "select 1").filter(|r| r == "1"));
    shm.note();
    assert!(!shm.seen.borrow().is_empty(), "postgres maps its dynamic shared memory from /dev/shm");
    // Rows in a logged table, and rows in an unlogged one: crash recovery (what a cold start
    // after the kill would do) empties unlogged tables, a restore keeps the running server's.
    psql(
        port,
        "create table kept (id int primary key, v text);\
         insert into kept select g, 'row ' || g from generate_series(1, 10000) g;\
         create unlogged table volatile_rows (id int);\
         insert into volatile_rows select generate_series(1, 500);",
    )
    .expect("load rows");
    let started_at = psql(port, "select pg_postmaster_start_time()").expect("start time");
    // A client session held open across the stop and start: its backend, its TCP connection
    // and its temporary table must come back with the server.
    let p = port.to_string();
    let mut session = Client(
        Command::new(format!("{PG_BIN}/psql"))
            .args(["-X", "-A", "-t", "-q", "-h", "127.0.0.1", "-p", &p, "-U", "postgres", "-d", "postgres"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run psql"),
    );
    let mut session_in = session.0.stdin.take().unwrap();
    let session_out = Lines::of(&mut session.0);
    use std::io::Write;
    writeln!(session_in, "create temp table mine as select 42 as answer;\nselect 'before', pg_backend_pid();").unwrap();
    let backend = session_out.next().expect("the session answers");
    assert!(backend.starts_with("before|"), "{backend}");
    let before = psql(port, "select count(*), sum(id) from kept").unwrap();
    assert_eq!(before, "10000|50005000");
    let t = Instant::now();
    env.ok(&["stop", "pg"]);
    eprintln!("TIMING postgres stop: {:.2}s", t.elapsed().as_secs_f64());
    assert!(psql(port, "select 1").is_none(), "postgres is down after the stop");
    let t = Instant::now();
    let back = env.start("pg");
    eprintln!("TIMING postgres start: {:.2}s", t.elapsed().as_secs_f64());
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    // A new client connects and queries the restored server.
    let after = wait_for("postgres after the restore", || psql(port, "select count(*), sum(id) from kept"));
    shm.note();
    assert_eq!(after, before, "the rows survived");
    assert_eq!(psql(port, "select count(*) from volatile_rows").as_deref(), Some("500"), "no crash recovery ran");
    assert_eq!(
        psql(port, "select pg_postmaster_start_time()").as_deref(),
        Some(started_at.as_str()),
        "the same postmaster, restored, not started again"
    );
    writeln!(session_in, "select 'after', pg_backend_pid(), answer from mine;").unwrap();
    assert_eq!(
        session_out.next(),
        Some(format!("{}|42", backend.replace("before", "after"))),
        "the session held across the stop and start still has its backend and its temporary table"
    );
    drop(session_in);
    assert!(session.0.wait().unwrap().success(), "psql ended cleanly");
    // It keeps working: a write after the restore.
    psql(port, "insert into kept values (10001, 'after')").expect("write after the restore");
    assert_eq!(psql(port, "select v from kept where id = 10001").as_deref(), Some("after"));
    shm.note();
    // A reboot empties /dev/shm, where PostgreSQL keeps its dynamic shared memory by default:
    // CRIU would fail to reopen the segments. The checkpoint carries them and puts them back.
    let mut mapped: Vec<PathBuf> = service_tree(&env, "pg").into_iter().flat_map(dev_shm_maps).collect();
    // Segments mapped after their name was removed (`... (deleted)`) are CRIU's to carry.
    mapped.retain(|f| f.exists());
    mapped.sort();
    mapped.dedup();
    assert!(!mapped.is_empty(), "the restored postgres maps its segments again");
    env.ok(&["stop", "pg"]);
    for f in &mapped {
        std::fs::remove_file(f).unwrap_or_else(|e| panic!("remove {}: {e}", f.display()));
    }
    let back = env.start("pg");
    assert_eq!(back["started_from"], "checkpoint", "restored although /dev/shm was emptied: {back}");
    for f in &mapped {
        assert!(f.exists(), "{} was put back", f.display());
    }
    let rows = wait_for("postgres after the second restore", || psql(port, "select count(*) from kept"));
    assert_eq!(rows, "10001");
    assert_eq!(psql(port, "select count(*) from volatile_rows").as_deref(), Some("500"), "no crash recovery ran");
    shm.note();
    env.ok(&["stop", "pg"]);
}

/// `mosquitto_sub` for one message on `topic`: the payload, if one came within 10 s.
fn mqtt_get(port: u16, topic: &str) -> Option<String> {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-C", "1", "-W", "10"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn mqtt_publish(port: u16, topic: &str, payload: &str, retain: bool) -> bool {
    let mut c = Command::new("mosquitto_pub");
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-m", payload, "-q", "1"]);
    if retain {
        c.arg("-r");
    }
    c.stdin(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

#[test]
fn mosquitto_keeps_a_retained_message_and_a_connected_subscriber_across_stop_and_start() {
    let env = Env::new();
    let [kill, port] = free_ports::<2>();
    let dir = owned_dir(&env, "mqtt", "mosquitto");
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"),
    )
    .unwrap();
    env.write_service(
        "mqtt",
        &format!(
            "command: [\"/usr/sbin/mosquitto\", \"-c\", \"{}\"]\nuser: mosquitto\nkill_port: {kill}\n",
            conf.display()
        ),
    );
    env.start("mqtt");
    let payload = format!("retained before the stop {}", std::process::id());
    wait_for("mosquitto", || mqtt_publish(port, "stasis/retained", &payload, true).then_some(()));
    assert_eq!(mqtt_get(port, "stasis/retained").as_deref(), Some(payload.as_str()), "retained before the stop");
    // A subscriber that stays connected across the stop and start.
    let p = port.to_string();
    let mut sub = Client(
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &p, "-t", "stasis/live", "-q", "1", "-i", "stasis-held-subscriber"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run mosquitto_sub"),
    );
    let held = Lines::of(&mut sub.0);
    wait_for("the held subscriber to get a message", || {
        assert!(mqtt_publish(port, "stasis/live", "before", false));
        held.within(std::time::Duration::from_secs(1)).filter(|l| l == "before")
    });
    let t = Instant::now();
    env.ok(&["stop", "mqtt"]);
    eprintln!("TIMING mosquitto stop: {:.2}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let back = env.start("mqtt");
    eprintln!("TIMING mosquitto start: {:.2}s", t.elapsed().as_secs_f64());
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    // persistence is off: only the restored broker's memory can still hold the message.
    assert_eq!(
        mqtt_get(port, "stasis/retained").as_deref(),
        Some(payload.as_str()),
        "a new subscriber gets the retained message"
    );
    assert!(mqtt_publish(port, "stasis/live", "after", false));
    let got = std::iter::from_fn(|| held.next()).find(|l| l != "before");
    assert_eq!(
        got.as_deref(),
        Some("after"),
        "the subscriber connected before the stop gets a message published after the start"
    );
    let log = env.log("mqtt");
    assert_eq!(
        log.matches(" as stasis-held-subscriber (").count(),
        1,
        "the subscriber did not reconnect: its connection itself was restored\n{log}"
    );
    drop(sub);
    env.ok(&["stop", "mqtt"]);
}
