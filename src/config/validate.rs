//! Semantic checks of a parsed service file, producing the [`Service`] the rest of stasis runs:
//! who it runs as (user, groups, never root by accident), its command, directory and environment,
//! its ports, its CRIU options, how it is stopped and its checkpoints kept and restored, its logs,
//! readiness, periodic checkpoints, restarts, compression and encryption. Every problem is
//! collected, not just the first, in the order of the checks.

use super::criu_options;
use super::error::{ConfigError, Problem};
use super::key_lines::line_of;
use super::schema::ServiceFile;
use super::trust;
use crate::paths::Dirs;
use nix::unistd::{Group, User};
use std::ffi::CString;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// systemd's default PATH for services.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_KEEP_CHECKPOINTS: usize = 2;
const DEFAULT_LOG_MAX_BYTES: u64 = 64 << 20;
const DEFAULT_LOG_KEEP: usize = 3;
const MAX_KEEP_CHECKPOINTS: u64 = 1000;
pub const DEFAULT_DUMP_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// When a started service counts as up (`ready:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// A TCP connection to HOST:PORT is accepted.
    Tcp(String),
    /// The command, run as the service user in its environment, exits 0.
    Exec(Vec<String>),
    /// The service sends `READY=1` to `$NOTIFY_SOCKET` (sd_notify), from a process of its tree.
    Notify,
}

const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the supervisor brings back a service that exits by itself (`restart:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    No,
    /// After an exit with a non-zero status or by a signal.
    OnFailure,
    /// After any exit that nobody asked for.
    Always,
}

/// What a restart brings back (`restart_from:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartFrom {
    Cold,
    /// The newest checkpoint, stale or not (the memory of minutes ago beats none); one whose
    /// restored service crashes again is skipped for the previous one, then cold.
    Checkpoint,
}

/// `restart_limit: N in WINDOW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartLimit {
    pub count: u32,
    pub within: Duration,
}

pub const DEFAULT_FULL_EVERY: u32 = 8;
pub const DEFAULT_MIN_FREE_BYTES: u64 = 256 << 20;
const DEFAULT_RESTART_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(60);
const DEFAULT_RESTART_LIMIT: RestartLimit = RestartLimit { count: 5, within: Duration::from_secs(600) };

/// What `start` does when the newest checkpoint does not fit the program on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnIncompatible {
    /// Keep the checkpoint (marked incompatible) and cold-start.
    Cold,
    /// Keep the checkpoint and refuse to start.
    Fail,
}

/// How a checkpoint's memory comes back (`restore:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// Every page is copied before the service resumes.
    Full,
    /// The service resumes at once; its private memory is served on demand and pushed in the
    /// background (criu::lazy).
    Lazy,
}

/// What `start` does when a file the service holds open for writing changed since the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFileChanged {
    /// Bring the file back to what the memory expects (an appended tail is kept beside it, a
    /// changed file is put back from the copy kept with the checkpoint) or refuse when it cannot.
    Restore,
    /// Refuse any change: keep the checkpoint and do not start.
    Refuse,
}

/// A validated service, ready to run.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub file: PathBuf,
    pub command: Vec<String>,
    /// uid of the service user (`user`).
    pub uid: u32,
    pub gid: u32,
    pub supplementary_gids: Vec<u32>,
    pub kill_port: u16,
    pub working_dir: PathBuf,
    /// The complete environment of the service, in order.
    pub environment: Vec<(String, String)>,
    pub criu_config: PathBuf,
    pub criu_options: Vec<String>,
    pub stop_timeout: Duration,
    pub restore_stale: bool,
    /// A stop first copies the memory while the service runs (engine::dump::pre_copy).
    pub stop_pre_copy: bool,
    pub keep_checkpoints: usize,
    pub on_incompatible: OnIncompatible,
    pub on_file_changed: OnFileChanged,
    pub dump_timeout: Duration,
    pub restore_timeout: Duration,
    /// uids of `kill_port_users`.
    pub kill_port_uids: Vec<u32>,
    pub log_max_bytes: u64,
    pub log_keep: usize,
    pub ready: Option<Readiness>,
    pub ready_timeout: Duration,
    pub checkpoint_every: Option<Duration>,
    pub full_every: u32,
    pub max_freeze: Option<Duration>,
    pub min_free_bytes: u64,
    pub restart: RestartPolicy,
    pub restart_from: RestartFrom,
    pub restart_backoff: Duration,
    pub restart_limit: RestartLimit,
    /// zstd level for checkpoints' pages, when `compression` is set.
    pub compression: Option<i32>,
    /// The key file that seals checkpoints' images (read when they are written or restored).
    pub encryption_key_file: Option<PathBuf>,
    /// `restore:` as the service file says it; None: the host's default decides (HostConfig).
    pub restore: Option<RestoreMode>,
}

impl Service {
    /// Digest of the settings that shape the process a checkpoint holds: a checkpoint taken
    /// under other settings restores the process as it was, not as the file now says.
    pub fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        let mut field = |b: &[u8]| {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        };
        for a in &self.command {
            field(a.as_bytes());
        }
        field(format!("{}:{}:{:?}", self.uid, self.gid, self.supplementary_gids).as_bytes());
        field(self.working_dir.as_os_str().as_encoded_bytes());
        for (k, v) in &self.environment {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        h.finalize().to_hex().to_string()
    }
}

struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn fail(&mut self, key: &str, message: impl Into<String>) {
        let path: Vec<&str> = key.split('.').map(|k| k.split('[').next().unwrap_or(k)).collect();
        self.problems.push(Problem { line: line_of(self.text, &path), key: key.to_string(), message: message.into() });
    }
}

pub fn validate(dirs: &Dirs, name: &str, path: &Path, text: &str, file: ServiceFile) -> Result<Service, ConfigError> {
    let mut c = Checker { text, problems: Vec::new() };
    // Problems are reported in the order they are found: the order of these checks is the report's.
    let identity = identity(&mut c, &file);
    if file.kill_port == 0 {
        c.fail("kill_port", "must be a TCP port between 1 and 65535");
    }
    let working_dir = working_dir(&mut c, file.working_dir.as_deref());
    let environment = build_environment(&mut c, identity.user.as_ref(), &file);
    check_command(&mut c, &file.command, &environment, &working_dir);
    let criu_config = criu_config(&mut c, dirs, file.criu.config.as_deref());
    for r in criu_options::check(&file.criu.options, false) {
        c.fail(&format!("criu.options[{}]", r.index), r.error.to_string());
    }
    let policy = checkpoint_policy(&mut c, &file);
    let kill_port_uids = kill_port_uids(&mut c, &file.kill_port_users);
    let logs = log_rotation(&mut c, &file);
    let ready = file.ready.as_ref().and_then(|v| readiness(&mut c, v));
    let ready_timeout = timeout(&mut c, "ready_timeout", file.ready_timeout.as_ref(), DEFAULT_READY_TIMEOUT);
    let periodic = periodic(&mut c, &file);
    let restart = restart(&mut c, &file);
    let compression = file.compression.as_ref().and_then(|v| compression(&mut c, v));
    let encryption_key_file = file.encryption_key_file.as_deref().and_then(|p| encryption_key_file(&mut c, p));
    let restore = file.restore.as_deref().map(|word| {
        choice(
            &mut c,
            "restore",
            Some(word),
            &[("full", RestoreMode::Full), ("lazy", RestoreMode::Lazy)],
            "use `full` (every page copied before the service resumes) or `lazy` (the service resumes at once, its memory served on demand)",
        )
    });
    if restart.from == RestartFrom::Checkpoint && restart.policy == RestartPolicy::No {
        c.fail("restart_from", "has no effect without `restart: on-failure` or `restart: always`");
    }

    match (c.problems.is_empty(), identity.user, identity.gid) {
        (true, Some(u), Some(gid)) => Ok(Service {
            name: name.to_string(),
            file: path.to_path_buf(),
            command: file.command,
            uid: u.uid.as_raw(),
            gid,
            supplementary_gids: identity.supplementary_gids,
            kill_port: file.kill_port,
            working_dir,
            environment,
            criu_config,
            criu_options: file.criu.options,
            stop_timeout: policy.stop_timeout,
            restore_stale: file.restore_stale.unwrap_or(false),
            stop_pre_copy: file.stop_pre_copy.unwrap_or(true),
            keep_checkpoints: policy.keep_checkpoints,
            on_incompatible: policy.on_incompatible,
            on_file_changed: policy.on_file_changed,
            dump_timeout: policy.dump_timeout,
            restore_timeout: policy.restore_timeout,
            kill_port_uids,
            log_max_bytes: logs.max_bytes,
            log_keep: logs.keep,
            ready,
            ready_timeout,
            checkpoint_every: periodic.every,
            full_every: periodic.full_every,
            max_freeze: periodic.max_freeze,
            min_free_bytes: periodic.min_free_bytes,
            restart: restart.policy,
            restart_from: restart.from,
            restart_backoff: restart.backoff,
            restart_limit: restart.limit,
            compression,
            encryption_key_file,
            restore,
        }),
        _ => Err(ConfigError::Invalid { path: path.to_path_buf(), problems: c.problems }),
    }
}

/// Who the service runs as. `user` and `gid` are None when they do not exist (a problem is
/// reported), and the other checks go on without them.
struct Identity {
    user: Option<User>,
    gid: Option<u32>,
    supplementary_gids: Vec<u32>,
}

/// `user`, `group` (the user's primary group when absent), the user's other groups, and whether
/// any of them is root's.
fn identity(c: &mut Checker, file: &ServiceFile) -> Identity {
    let user = lookup_user(c, &file.user);
    let gid = match (&file.group, &user) {
        (Some(g), _) => match Group::from_name(g) {
            Ok(Some(g)) => Some(g.gid.as_raw()),
            _ => {
                c.fail("group", format!("group \"{g}\" does not exist; create it with `groupadd --system {g}` or remove the key to use the user's primary group"));
                None
            }
        },
        (None, Some(u)) => Some(u.gid.as_raw()),
        (None, None) => None,
    };
    let supplementary_gids = match (&user, gid) {
        (Some(u), Some(g)) => CString::new(u.name.clone())
            .ok()
            .and_then(|n| nix::unistd::getgrouplist(&n, nix::unistd::Gid::from_raw(g)).ok())
            .map(|v| v.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_else(|| vec![g]),
        _ => Vec::new(),
    };
    let group_key = if file.group.is_some() { "group" } else { "user" };
    check_root(c, user.as_ref(), (gid, group_key), &supplementary_gids, file.allow_root == Some(true));
    Identity { user, gid, supplementary_gids }
}

fn lookup_user(c: &mut Checker, name: &str) -> Option<User> {
    match User::from_name(name) {
        Ok(Some(u)) => Some(u),
        Ok(None) => {
            c.fail(
                "user",
                format!("user \"{name}\" does not exist; create it with `useradd --system --no-create-home --shell /usr/sbin/nologin {name}` or name an existing user"),
            );
            None
        }
        Err(e) => {
            c.fail("user", format!("failed to look up user \"{name}\": {e}"));
            None
        }
    }
}

/// `working_dir`, `/` when absent as systemd has it.
fn working_dir(c: &mut Checker, value: Option<&str>) -> PathBuf {
    let working_dir = PathBuf::from(value.unwrap_or("/"));
    if !working_dir.is_absolute() {
        c.fail("working_dir", format!("must be an absolute path, not \"{}\"", working_dir.display()));
    } else if !working_dir.is_dir() {
        c.fail("working_dir", format!("{} is not a directory; create it or change the key", working_dir.display()));
    }
    working_dir
}

/// `criu.config`: the name of a file in the CRIU config directory, never a path.
fn criu_config(c: &mut Checker, dirs: &Dirs, value: Option<&str>) -> PathBuf {
    let profile = value.unwrap_or("default");
    let criu_config = dirs.criu_config_dir.join(format!("{profile}.conf"));
    if profile.is_empty() || !profile.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_') {
        c.fail(
            "criu.config",
            format!(
                "\"{profile}\" is not a config name (letters, digits, '-', '_'): it names a file in {}",
                dirs.criu_config_dir.display()
            ),
        );
    } else if !criu_config.is_file() {
        c.fail(
            "criu.config",
            format!(
                "{} does not exist; pick one of {} or pass --criu-config-dir",
                criu_config.display(),
                available_profiles(&dirs.criu_config_dir)
            ),
        );
    } else {
        check_criu_config(c, &dirs.criu_config_dir, &criu_config);
    }
    criu_config
}

/// How a service is stopped, and what is done with its checkpoints.
struct CheckpointPolicy {
    stop_timeout: Duration,
    keep_checkpoints: usize,
    on_incompatible: OnIncompatible,
    on_file_changed: OnFileChanged,
    dump_timeout: Duration,
    restore_timeout: Duration,
}

fn checkpoint_policy(c: &mut Checker, file: &ServiceFile) -> CheckpointPolicy {
    let stop_timeout = in_range(c, "stop_timeout_secs", file.stop_timeout_secs, 1..=3600, "use 1 to 3600 seconds")
        .map_or(DEFAULT_STOP_TIMEOUT, Duration::from_secs);
    let fix = format!("keep 1 to {MAX_KEEP_CHECKPOINTS} checkpoints (default {DEFAULT_KEEP_CHECKPOINTS})");
    let keep_checkpoints = in_range(c, "keep_checkpoints", file.keep_checkpoints, 1..=MAX_KEEP_CHECKPOINTS, &fix)
        .map_or(DEFAULT_KEEP_CHECKPOINTS, |n| n as usize);
    let on_incompatible = choice(
        c,
        "on_incompatible",
        file.on_incompatible.as_deref(),
        &[("cold", OnIncompatible::Cold), ("fail", OnIncompatible::Fail)],
        "use `cold` (keep the checkpoint and cold-start) or `fail` (keep it and refuse to start)",
    );
    let on_file_changed = choice(
        c,
        "on_file_changed",
        file.on_file_changed.as_deref(),
        &[("restore", OnFileChanged::Restore), ("refuse", OnFileChanged::Refuse)],
        "use `restore` (put the file back as the checkpoint expects, keeping what was added beside it) or `refuse` (keep the checkpoint and refuse to start)",
    );
    CheckpointPolicy {
        stop_timeout,
        keep_checkpoints,
        on_incompatible,
        on_file_changed,
        dump_timeout: timeout(c, "dump_timeout", file.dump_timeout.as_ref(), DEFAULT_DUMP_TIMEOUT),
        restore_timeout: timeout(c, "restore_timeout", file.restore_timeout.as_ref(), DEFAULT_RESTORE_TIMEOUT),
    }
}

/// `kill_port_users`: the uids of those, besides root and the service user, who may stop it.
fn kill_port_uids(c: &mut Checker, names: &[String]) -> Vec<u32> {
    let mut uids = Vec::new();
    for (i, name) in names.iter().enumerate() {
        match User::from_name(name) {
            Ok(Some(u)) => uids.push(u.uid.as_raw()),
            _ => c.fail(
                &format!("kill_port_users[{i}]"),
                format!("user \"{name}\" does not exist; list existing users who may stop this service through its kill port"),
            ),
        }
    }
    uids
}

struct LogRotation {
    max_bytes: u64,
    keep: usize,
}

fn log_rotation(c: &mut Checker, file: &ServiceFile) -> LogRotation {
    let max_bytes = match file.log_max_bytes {
        None => DEFAULT_LOG_MAX_BYTES,
        Some(n) if n >= 1 << 20 => n,
        Some(n) => {
            c.fail("log_max_bytes", format!("{n} is too small; use at least 1048576 (1 MiB); the default is 64 MiB"));
            DEFAULT_LOG_MAX_BYTES
        }
    };
    let fix = format!("keep 0 to 100 rotated logs (default {DEFAULT_LOG_KEEP})");
    let keep = in_range(c, "log_keep", file.log_keep, 0..=100, &fix).map_or(DEFAULT_LOG_KEEP, |n| n as usize);
    LogRotation { max_bytes, keep }
}

/// Checkpoints taken while the service runs.
struct Periodic {
    every: Option<Duration>,
    full_every: u32,
    max_freeze: Option<Duration>,
    min_free_bytes: u64,
}

fn periodic(c: &mut Checker, file: &ServiceFile) -> Periodic {
    let every =
        file.checkpoint_every.as_ref().map(|v| timeout(c, "checkpoint_every", Some(v), Duration::from_secs(900)));
    let fix = format!("a full dump after 1 to 1000 incremental ones (default {DEFAULT_FULL_EVERY})");
    let full_every =
        in_range(c, "full_every", file.full_every, 1..=1000, &fix).map_or(DEFAULT_FULL_EVERY, |n| n as u32);
    let max_freeze = match file.max_freeze_ms {
        Some(0) => {
            c.fail(
                "max_freeze_ms",
                "0 would warn about every checkpoint; give the longest freeze you accept in milliseconds, e.g. 100",
            );
            None
        }
        other => other.map(Duration::from_millis),
    };
    Periodic { every, full_every, max_freeze, min_free_bytes: file.min_free_bytes.unwrap_or(DEFAULT_MIN_FREE_BYTES) }
}

/// Whether, when and how often a service that exits by itself is brought back.
struct Restart {
    policy: RestartPolicy,
    from: RestartFrom,
    backoff: Duration,
    limit: RestartLimit,
}

fn restart(c: &mut Checker, file: &ServiceFile) -> Restart {
    let policy = file.restart.as_ref().map_or(RestartPolicy::No, |v| restart_policy(c, v));
    let from = choice(
        c,
        "restart_from",
        file.restart_from.as_deref(),
        &[("cold", RestartFrom::Cold), ("checkpoint", RestartFrom::Checkpoint)],
        "use `cold` (a fresh launch) or `checkpoint` (the newest checkpoint, then older ones, then cold)",
    );
    let backoff = match &file.restart_backoff {
        None => DEFAULT_RESTART_BACKOFF,
        Some(v) => match parse_duration(v) {
            Some(d) if d >= Duration::from_millis(100) && d <= MAX_RESTART_BACKOFF => d,
            _ => {
                c.fail(
                    "restart_backoff",
                    format!(
                        "{} is not a duration between 100ms and 60s; write e.g. `1s` or `500ms` (the first restart's delay; each next one doubles, up to 60s)",
                        shown(v)
                    ),
                );
                DEFAULT_RESTART_BACKOFF
            }
        },
    };
    let limit = match file.restart_limit.as_deref() {
        None => DEFAULT_RESTART_LIMIT,
        Some(text) => parse_restart_limit(text).unwrap_or_else(|| {
            c.fail("restart_limit", format!("\"{text}\" is not `COUNT in DURATION`; write e.g. `5 in 10m` (at most 5 restarts in any 10 minutes)"));
            DEFAULT_RESTART_LIMIT
        }),
    };
    Restart { policy, from, backoff, limit }
}

fn restart_policy(c: &mut Checker, v: &serde_yaml::Value) -> RestartPolicy {
    // YAML 1.1 readers take a bare `no` for false; accept both spellings.
    if let serde_yaml::Value::Bool(false) = v {
        return RestartPolicy::No;
    }
    match v.as_str() {
        Some("no") => RestartPolicy::No,
        Some("on-failure") => RestartPolicy::OnFailure,
        Some("always") => RestartPolicy::Always,
        _ => {
            c.fail(
                "restart",
                format!(
                    "{} is not a choice; use `no`, `on-failure` (after a non-zero exit or a signal) or `always`",
                    shown(v)
                ),
            );
            RestartPolicy::No
        }
    }
}

/// `compression: zstd` or `compression: {zstd: LEVEL}`: the zstd level.
fn compression(c: &mut Checker, v: &serde_yaml::Value) -> Option<i32> {
    const HOW: &str =
        "write `compression: zstd` (level 3) or `compression: {zstd: LEVEL}` with LEVEL 1 (fastest) to 19 (smallest)";
    let level = match v {
        serde_yaml::Value::String(s) if s == "zstd" => Some(3),
        serde_yaml::Value::Mapping(m) if m.len() == 1 => match m.get("zstd").and_then(|l| l.as_i64()) {
            Some(l @ 1..=19) => Some(l as i32),
            _ => None,
        },
        _ => None,
    };
    if level.is_none() {
        c.fail("compression", format!("{} is not a compression; {HOW}", shown(v)));
    }
    level
}

/// Its form, and whose it is when it exists: it is read when a checkpoint is written or restored.
fn encryption_key_file(c: &mut Checker, p: &str) -> Option<PathBuf> {
    let path = PathBuf::from(p);
    if path.is_absolute() {
        for e in trust::check_file_if_present(&path) {
            c.fail("encryption_key_file", e.to_string());
        }
        Some(path)
    } else {
        c.fail("encryption_key_file", format!("\"{p}\" is not an absolute path; write e.g. `/etc/stasis/keys/NAME.key` (32 random bytes: `head -c 32 /dev/urandom > FILE && chmod 600 FILE`)"));
        None
    }
}

/// A number key: `value` when it is in `range`; absent, or out of range (reported with `fix`), None.
fn in_range(c: &mut Checker, key: &str, value: Option<u64>, range: RangeInclusive<u64>, fix: &str) -> Option<u64> {
    let n = value?;
    if range.contains(&n) {
        return Some(n);
    }
    c.fail(key, format!("{n} is out of range; {fix}"));
    None
}

/// A key of a few words, the first of `choices` when absent; an unknown word is reported with
/// `fix` and taken as the first.
fn choice<T: Copy>(c: &mut Checker, key: &str, value: Option<&str>, choices: &[(&str, T)], fix: &str) -> T {
    let default = choices[0].1;
    let Some(word) = value else { return default };
    match choices.iter().find(|(w, _)| *w == word) {
        Some((_, t)) => *t,
        None => {
            c.fail(key, format!("\"{word}\" is not a choice; {fix}"));
            default
        }
    }
}

/// A YAML value as the file wrote it, for a message.
fn shown(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v).unwrap_or_default().trim().to_string()
}

/// `ready: {tcp: "HOST:PORT"}`, `ready: {exec: [cmd, args...]}` or `ready: notify`.
fn readiness(c: &mut Checker, v: &serde_yaml::Value) -> Option<Readiness> {
    const HOW: &str = "write `ready: {tcp: \"127.0.0.1:6390\"}` (a connection is accepted), `ready: {exec: [\"redis-cli\", \"-p\", \"6390\", \"ping\"]}` (the command exits 0) or `ready: notify` (the service sends READY=1 to $NOTIFY_SOCKET)";
    if v.as_str() == Some("notify") {
        return Some(Readiness::Notify);
    }
    let Some(map) = v.as_mapping().filter(|m| m.len() == 1) else {
        c.fail("ready", format!("unknown form; {HOW}"));
        return None;
    };
    let (k, val) = map.iter().next().expect("one entry");
    match (k.as_str(), val) {
        (Some("tcp"), serde_yaml::Value::String(addr)) => match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                Some(Readiness::Tcp(addr.clone()))
            }
            _ => {
                c.fail("ready.tcp", format!("\"{addr}\" is not HOST:PORT; {HOW}"));
                None
            }
        },
        (Some("exec"), serde_yaml::Value::Sequence(items)) => {
            let cmd: Option<Vec<String>> = items.iter().map(|i| i.as_str().map(str::to_string)).collect();
            match cmd {
                Some(cmd) if !cmd.is_empty() && !cmd[0].is_empty() => Some(Readiness::Exec(cmd)),
                _ => {
                    c.fail("ready.exec", format!("must be a non-empty list of strings; {HOW}"));
                    None
                }
            }
        }
        _ => {
            c.fail("ready", format!("unknown form; {HOW}"));
            None
        }
    }
}

/// A timeout key: 1 s to 24 h, `default` when absent.
fn timeout(c: &mut Checker, key: &str, value: Option<&serde_yaml::Value>, default: Duration) -> Duration {
    let Some(v) = value else { return default };
    match parse_duration(v) {
        Some(d) if d >= Duration::from_secs(1) && d <= MAX_TIMEOUT => d,
        _ => {
            c.fail(
                key,
                format!(
                    "{} is not a duration between 1s and 24h; write e.g. `90s`, `10m`, `1h` or a number of seconds (default {})",
                    shown(v),
                    crate::time_fmt::human_duration(default)
                ),
            );
            default
        }
    }
}

/// `90s`, `10m`, `1h`, `1h30m`, `500ms` or a plain number of seconds.
pub fn parse_duration(v: &serde_yaml::Value) -> Option<Duration> {
    if let Some(n) = v.as_u64() {
        return Some(Duration::from_secs(n));
    }
    let text = v.as_str()?.trim();
    if text.is_empty() {
        return None;
    }
    let (mut millis, mut num) = (0u64, String::new());
    let mut chars = text.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch.is_ascii_digit() {
            num.push(ch);
            continue;
        }
        let unit = match ch {
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            's' => 1000,
            'm' => 60_000,
            'h' => 3_600_000,
            _ => return None,
        };
        millis = millis.checked_add(num.parse::<u64>().ok()?.checked_mul(unit)?)?;
        num.clear();
    }
    if !num.is_empty() {
        millis = millis.checked_add(num.parse::<u64>().ok()?.checked_mul(1000)?)?;
    }
    Some(Duration::from_millis(millis))
}

/// `5 in 10m`.
fn parse_restart_limit(text: &str) -> Option<RestartLimit> {
    let (count, within) = text.split_once(" in ")?;
    let count: u32 = count.trim().parse().ok().filter(|n| *n >= 1)?;
    let within = parse_duration(&serde_yaml::Value::String(within.trim().to_string()))?;
    (within >= Duration::from_secs(1)).then_some(RestartLimit { count, within })
}

/// A clean environment, as systemd gives services: PATH, HOME, USER, LOGNAME, SHELL, then the file's.
fn build_environment(c: &mut Checker, user: Option<&User>, file: &ServiceFile) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![("PATH".into(), DEFAULT_PATH.into())];
    if let Some(u) = user {
        env.push(("HOME".into(), u.dir.display().to_string()));
        env.push(("USER".into(), u.name.clone()));
        env.push(("LOGNAME".into(), u.name.clone()));
        env.push(("SHELL".into(), u.shell.display().to_string()));
    }
    for (k, v) in &file.environment {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            c.fail(
                &format!("environment.{k}"),
                "variable names must be non-empty without '=' and values without NUL bytes",
            );
            continue;
        }
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    env
}

fn check_command(c: &mut Checker, command: &[String], env: &[(String, String)], cwd: &Path) {
    let Some(program) = command.first() else {
        c.fail(
            "command",
            "must list at least the program to run, e.g. [\"/usr/bin/redis-server\", \"--port\", \"6390\"]",
        );
        return;
    };
    if program.is_empty() {
        c.fail("command[0]", "the program name is empty");
        return;
    }
    if command.iter().any(|a| a.contains('\0')) {
        c.fail("command", "arguments must not contain NUL bytes");
    }
    let path_var = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or(DEFAULT_PATH);
    if program.contains('/') {
        let p = if Path::new(program).is_absolute() { PathBuf::from(program) } else { cwd.join(program) };
        if !p.is_file() {
            c.fail("command[0]", format!("{} does not exist or is not a file", p.display()));
        }
    } else if which::which_in(program, Some(path_var), cwd).is_err() {
        c.fail(
            "command[0]",
            format!(
                "\"{program}\" was not found in the service's PATH ({path_var}); install it or give an absolute path"
            ),
        );
    }
}

/// A service that would run with root's uid or gid has nothing between it and the host; that
/// must be asked for, not fallen into by naming a user who happens to be uid 0.
/// `gid` comes with the key that chose it (`group`, or `user` for the user's primary group).
fn check_root(c: &mut Checker, user: Option<&User>, gid: (Option<u32>, &str), groups: &[u32], allowed: bool) {
    if allowed {
        return;
    }
    const FIX: &str = "run it as its own user (`useradd --system --no-create-home --shell /usr/sbin/nologin NAME`), or add `allow_root: true` if it really needs root";
    if let Some(u) = user.filter(|u| u.uid.is_root()) {
        c.fail("user", format!("user \"{}\" is uid 0: the service would run as root; {FIX}", u.name));
    } else if gid.0 == Some(0) {
        c.fail(gid.1, format!("the service would run with gid 0 (root's group); {FIX}"));
    } else if groups.contains(&0) {
        c.fail("user", format!("the user is in group 0 (root's group), which the service would hold; {FIX}"));
    }
}

/// The CRIU config a service selects, and the directory it is in, must be root's alone, and
/// every line in it must be an option a service may add (CRIU reads it as root, as options).
fn check_criu_config(c: &mut Checker, dir: &Path, file: &Path) {
    for e in trust::check_dir(dir) {
        c.fail("criu.config", e.to_string());
    }
    match trust::read_file(file) {
        Err(e) => c.fail("criu.config", e.to_string()),
        Ok(read) => {
            for e in read.untrusted {
                c.fail("criu.config", e.to_string());
            }
            for (line, why) in criu_options::check_config_text(&read.text) {
                c.fail("criu.config", format!("{} line {line}: {why}", file.display()));
            }
        }
    }
}

fn available_profiles(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".conf")).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        format!("the files in {} (none found)", dir.display())
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_duration, parse_restart_limit, RestartLimit};
    use std::time::Duration;

    #[test]
    fn durations() {
        let d = |s: &str| parse_duration(&serde_yaml::from_str(s).unwrap());
        assert_eq!(d("90"), Some(Duration::from_secs(90)));
        assert_eq!(d("\"2s\""), Some(Duration::from_secs(2)));
        assert_eq!(d("10m"), Some(Duration::from_secs(600)));
        assert_eq!(d("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(d("soon"), None);
        assert_eq!(d("\"\""), None);
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("1m30s"), Some(Duration::from_secs(90)));
    }

    #[test]
    fn restart_limits() {
        assert_eq!(parse_restart_limit("5 in 10m"), Some(RestartLimit { count: 5, within: Duration::from_secs(600) }));
        assert_eq!(parse_restart_limit("0 in 10m"), None, "a limit of nothing is not a limit");
        assert_eq!(parse_restart_limit("5 per 10m"), None);
        assert_eq!(parse_restart_limit("3 in 500ms"), None, "a window under a second is a typo");
    }

    const PINNED_MANY: &str = r#"invalid service file /nonexistent/fuzz.yaml:
  line 2, key `user`: user "no-such-user-xyz" does not exist; create it with `useradd --system --no-create-home --shell /usr/sbin/nologin no-such-user-xyz` or name an existing user
  line 3, key `group`: group "no-such-group-xyz" does not exist; create it with `groupadd --system no-such-group-xyz` or remove the key to use the user's primary group
  line 4, key `kill_port`: must be a TCP port between 1 and 65535
  line 5, key `working_dir`: must be an absolute path, not "relative/dir"
  line 7, key `environment.A=B`: variable names must be non-empty without '=' and values without NUL bytes
  line 1, key `command[0]`: /nonexistent/prog does not exist or is not a file
  line 9, key `criu.config`: "bad name" is not a config name (letters, digits, '-', '_'): it names a file in DIR
  line 10, key `criu.options[0]`: "--bogus-option" is not an option of CRIU 4.2.1; remove it (options a service may add: --tcp-established, --tcp-close, --network-lock=VALUE, --file-locks, --skip-in-flight, --link-remap, --ext-unix-sk, --ghost-limit=VALUE, --allow-uprobes, and --no-NAME of each switch)
  line 11, key `stop_timeout_secs`: 0 is out of range; use 1 to 3600 seconds
  line 12, key `keep_checkpoints`: 0 is out of range; keep 1 to 1000 checkpoints (default 2)
  line 13, key `on_incompatible`: "maybe" is not a choice; use `cold` (keep the checkpoint and cold-start) or `fail` (keep it and refuse to start)
  line 14, key `on_file_changed`: "maybe" is not a choice; use `restore` (put the file back as the checkpoint expects, keeping what was added beside it) or `refuse` (keep the checkpoint and refuse to start)
  line 15, key `dump_timeout`: soon is not a duration between 1s and 24h; write e.g. `90s`, `10m`, `1h` or a number of seconds (default 10m)
  line 16, key `restore_timeout`: 0 is not a duration between 1s and 24h; write e.g. `90s`, `10m`, `1h` or a number of seconds (default 5m)
  line 17, key `kill_port_users[0]`: user "no-such-user-xyz" does not exist; list existing users who may stop this service through its kill port
  line 18, key `log_max_bytes`: 10 is too small; use at least 1048576 (1 MiB); the default is 64 MiB
  line 19, key `log_keep`: 101 is out of range; keep 0 to 100 rotated logs (default 3)
  key `ready.tcp`: "nope" is not HOST:PORT; write `ready: {tcp: "127.0.0.1:6390"}` (a connection is accepted), `ready: {exec: ["redis-cli", "-p", "6390", "ping"]}` (the command exits 0) or `ready: notify` (the service sends READY=1 to $NOTIFY_SOCKET)
  line 21, key `ready_timeout`: 25h is not a duration between 1s and 24h; write e.g. `90s`, `10m`, `1h` or a number of seconds (default 1m)
  line 22, key `checkpoint_every`: 0 is not a duration between 1s and 24h; write e.g. `90s`, `10m`, `1h` or a number of seconds (default 15m)
  line 23, key `full_every`: 0 is out of range; a full dump after 1 to 1000 incremental ones (default 8)
  line 24, key `max_freeze_ms`: 0 would warn about every checkpoint; give the longest freeze you accept in milliseconds, e.g. 100
  line 25, key `restart`: sometimes is not a choice; use `no`, `on-failure` (after a non-zero exit or a signal) or `always`
  line 26, key `restart_from`: "nowhere" is not a choice; use `cold` (a fresh launch) or `checkpoint` (the newest checkpoint, then older ones, then cold)
  line 27, key `restart_backoff`: 1ms is not a duration between 100ms and 60s; write e.g. `1s` or `500ms` (the first restart's delay; each next one doubles, up to 60s)
  line 28, key `restart_limit`: "lots" is not `COUNT in DURATION`; write e.g. `5 in 10m` (at most 5 restarts in any 10 minutes)
  line 29, key `compression`: gzip is not a compression; write `compression: zstd` (level 3) or `compression: {zstd: LEVEL}` with LEVEL 1 (fastest) to 19 (smallest)
  line 30, key `encryption_key_file`: "relative.key" is not an absolute path; write e.g. `/etc/stasis/keys/NAME.key` (32 random bytes: `head -c 32 /dev/urandom > FILE && chmod 600 FILE`)
  line 31, key `restore`: "sometimes" is not a choice; use `full` (every page copied before the service resumes) or `lazy` (the service resumes at once, its memory served on demand)"#;

    const PINNED_ROOT: &str = r#"invalid service file /nonexistent/fuzz.yaml:
  line 2, key `user`: user "root" is uid 0: the service would run as root; run it as its own user (`useradd --system --no-create-home --shell /usr/sbin/nologin NAME`), or add `allow_root: true` if it really needs root
  key `criu.config`: DIR/missing.conf does not exist; pick one of default or pass --criu-config-dir
  key `ready.exec`: must be a non-empty list of strings; write `ready: {tcp: "127.0.0.1:6390"}` (a connection is accepted), `ready: {exec: ["redis-cli", "-p", "6390", "ping"]}` (the command exits 0) or `ready: notify` (the service sends READY=1 to $NOTIFY_SOCKET)
  line 7, key `compression`: zstd: 20 is not a compression; write `compression: zstd` (level 3) or `compression: {zstd: LEVEL}` with LEVEL 1 (fastest) to 19 (smallest)
  line 6, key `restart_from`: has no effect without `restart: on-failure` or `restart: always`"#;

    const PINNED_ALL: &str = r#"Service {
    name: "fuzz",
    file: "/nonexistent/fuzz.yaml",
    command: [
        "sh",
        "-c",
        "sleep 1",
    ],
    uid: 0,
    gid: 0,
    supplementary_gids: [],
    kill_port: 7000,
    working_dir: "/tmp",
    environment: [
        (
            "PATH",
            "/bin",
        ),
        (
            "USER",
            "root",
        ),
        (
            "LOGNAME",
            "root",
        ),
        (
            "A",
            "b",
        ),
    ],
    criu_config: "DIR/default.conf",
    criu_options: [
        "--tcp-established",
    ],
    stop_timeout: 7s,
    restore_stale: true,
    stop_pre_copy: false,
    keep_checkpoints: 4,
    on_incompatible: Fail,
    on_file_changed: Refuse,
    dump_timeout: 90s,
    restore_timeout: 120s,
    kill_port_uids: [
        0,
    ],
    log_max_bytes: 2097152,
    log_keep: 5,
    ready: Some(
        Tcp(
            "127.0.0.1:7001",
        ),
    ),
    ready_timeout: 30s,
    checkpoint_every: Some(
        900s,
    ),
    full_every: 3,
    max_freeze: Some(
        250ms,
    ),
    min_free_bytes: 1000,
    restart: OnFailure,
    restart_from: Checkpoint,
    restart_backoff: 500ms,
    restart_limit: RestartLimit {
        count: 3,
        within: 60s,
    },
    compression: Some(
        9,
    ),
    encryption_key_file: Some(
        "/nonexistent/stasis.key",
    ),
    restore: Some(
        Lazy,
    ),
}"#;

    /// A criu config dir of root's with an empty `default.conf`, and the text validate reports
    /// (or the service it makes, with what depends on the host's root account left out), with
    /// the temporary directory's path as DIR.
    fn report(text: &str) -> String {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("default.conf"), "").unwrap();
        let dirs = crate::paths::Dirs::new("/c".into(), "/s".into(), "/r".into(), Some(d.path().into()), "/h".into());
        let out = match crate::config::parse_and_validate_for_fuzzing(&dirs, text) {
            Ok(mut s) => {
                s.environment.retain(|(k, _)| k != "HOME" && k != "SHELL");
                s.supplementary_gids.clear();
                format!("{s:#?}")
            }
            Err(e) => e.to_string(),
        };
        out.replace(&d.path().display().to_string(), "DIR")
    }

    /// Every problem, in order: the report is pinned, so splitting or reordering the checks
    /// cannot change it unnoticed.
    #[test]
    fn problems_are_reported_in_order() {
        let text = r#"command: ["/nonexistent/prog", "a"]
user: no-such-user-xyz
group: no-such-group-xyz
kill_port: 0
working_dir: relative/dir
environment:
  "A=B": x
criu:
  config: "bad name"
  options: ["--bogus-option"]
stop_timeout_secs: 0
keep_checkpoints: 0
on_incompatible: maybe
on_file_changed: maybe
dump_timeout: soon
restore_timeout: 0
kill_port_users: [no-such-user-xyz]
log_max_bytes: 10
log_keep: 101
ready: {tcp: "nope"}
ready_timeout: 25h
checkpoint_every: 0
full_every: 0
max_freeze_ms: 0
restart: sometimes
restart_from: nowhere
restart_backoff: 1ms
restart_limit: lots
compression: gzip
encryption_key_file: relative.key
restore: sometimes
"#;
        assert_eq!(report(text), PINNED_MANY);
        let text = r#"command: [sh]
user: root
kill_port: 7000
criu: {config: missing}
ready: {exec: []}
restart_from: checkpoint
compression: {zstd: 20}
"#;
        assert_eq!(report(text), PINNED_ROOT);
    }

    /// A service with every key set: each value lands in its own field.
    #[test]
    fn every_key_lands_in_its_field() {
        let text = r#"command: [sh, -c, "sleep 1"]
user: root
allow_root: true
kill_port: 7000
working_dir: /tmp
environment: {A: b, PATH: /bin}
criu: {options: ["--tcp-established"]}
stop_timeout_secs: 7
restore_stale: true
stop_pre_copy: false
keep_checkpoints: 4
on_incompatible: fail
on_file_changed: refuse
dump_timeout: 90s
restore_timeout: 2m
kill_port_users: [root]
log_max_bytes: 2097152
log_keep: 5
ready: {tcp: "127.0.0.1:7001"}
ready_timeout: 30
checkpoint_every: 15m
full_every: 3
max_freeze_ms: 250
min_free_bytes: 1000
restart: on-failure
restart_from: checkpoint
restart_backoff: 500ms
restart_limit: 3 in 1m
compression: {zstd: 9}
encryption_key_file: /nonexistent/stasis.key
restore: lazy
"#;
        assert_eq!(report(text), PINNED_ALL);
    }
}
