//! Semantic checks of a parsed service file (users, groups, paths, ports, CRIU options),
//! producing the [`Service`] the rest of stasis runs. Every problem is collected, not just the first.

use super::error::{ConfigError, Problem};
use super::key_lines::line_of;
use super::schema::ServiceFile;
use crate::paths::Dirs;
use nix::unistd::{Group, User};
use std::ffi::CString;
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

/// What `start` does when the newest checkpoint does not fit the program on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnIncompatible {
    /// Keep the checkpoint (marked incompatible) and cold-start.
    Cold,
    /// Keep the checkpoint and refuse to start.
    Fail,
}
/// Options stasis sets itself; letting a service file override them would break the store or the supervisor.
const RESERVED_CRIU_OPTIONS: &[&str] = &[
    "-D",
    "--images-dir",
    "-t",
    "--tree",
    "-o",
    "--log-file",
    "-W",
    "--work-dir",
    "--pidfile",
    "-d",
    "--restore-detached",
    "-R",
    "--leave-running",
    "--leave-stopped",
    "--action-script",
    "--config",
    "--inherit-fd",
    "-s",
    "--leave-stopped",
    "--restore-sibling",
];

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
    pub keep_checkpoints: usize,
    pub on_incompatible: OnIncompatible,
    pub dump_timeout: Duration,
    pub restore_timeout: Duration,
    /// uids of `kill_port_users`.
    pub kill_port_uids: Vec<u32>,
    pub log_max_bytes: u64,
    pub log_keep: usize,
    pub ready: Option<Readiness>,
    pub ready_timeout: Duration,
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

    let user = match User::from_name(&file.user) {
        Ok(Some(u)) => Some(u),
        Ok(None) => {
            c.fail(
                "user",
                format!(
                    "user \"{0}\" does not exist; create it with `useradd --system --no-create-home --shell /usr/sbin/nologin {0}` or name an existing user",
                    file.user
                ),
            );
            None
        }
        Err(e) => {
            c.fail("user", format!("failed to look up user \"{}\": {e}", file.user));
            None
        }
    };
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

    if file.kill_port == 0 {
        c.fail("kill_port", "must be a TCP port between 1 and 65535");
    }

    let working_dir = PathBuf::from(file.working_dir.as_deref().unwrap_or("/"));
    if !working_dir.is_absolute() {
        c.fail("working_dir", format!("must be an absolute path, not \"{}\"", working_dir.display()));
    } else if !working_dir.is_dir() {
        c.fail("working_dir", format!("{} is not a directory; create it or change the key", working_dir.display()));
    }

    let environment = build_environment(&mut c, user.as_ref(), &file);
    check_command(&mut c, &file.command, &environment, &working_dir);

    let profile = file.criu.config.clone().unwrap_or_else(|| "default".to_string());
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
    }
    for (i, opt) in file.criu.options.iter().enumerate() {
        let flag = opt.split('=').next().unwrap_or(opt);
        if !opt.starts_with('-') {
            c.fail(&format!("criu.options[{i}]"), format!("\"{opt}\" is not an option; write each option as it would appear on criu's command line, e.g. \"--tcp-close\""));
        } else if RESERVED_CRIU_OPTIONS.contains(&flag) {
            c.fail(&format!("criu.options[{i}]"), format!("{flag} is set by stasis itself and cannot be overridden"));
        }
    }
    let stop_timeout = match file.stop_timeout_secs {
        None => DEFAULT_STOP_TIMEOUT,
        Some(s) if (1..=3600).contains(&s) => Duration::from_secs(s),
        Some(s) => {
            c.fail("stop_timeout_secs", format!("{s} is out of range; use 1 to 3600 seconds"));
            DEFAULT_STOP_TIMEOUT
        }
    };

    let keep_checkpoints = match file.keep_checkpoints {
        None => DEFAULT_KEEP_CHECKPOINTS,
        Some(n) if (1..=MAX_KEEP_CHECKPOINTS).contains(&n) => n as usize,
        Some(n) => {
            c.fail(
                "keep_checkpoints",
                format!("{n} is out of range; keep 1 to {MAX_KEEP_CHECKPOINTS} checkpoints (default {DEFAULT_KEEP_CHECKPOINTS})"),
            );
            DEFAULT_KEEP_CHECKPOINTS
        }
    };
    let on_incompatible = match file.on_incompatible.as_deref() {
        None | Some("cold") => OnIncompatible::Cold,
        Some("fail") => OnIncompatible::Fail,
        Some(other) => {
            c.fail(
                "on_incompatible",
                format!("\"{other}\" is not a choice; use `cold` (keep the checkpoint and cold-start) or `fail` (keep it and refuse to start)"),
            );
            OnIncompatible::Cold
        }
    };
    let dump_timeout = timeout(&mut c, "dump_timeout", file.dump_timeout.as_ref(), DEFAULT_DUMP_TIMEOUT);
    let restore_timeout = timeout(&mut c, "restore_timeout", file.restore_timeout.as_ref(), DEFAULT_RESTORE_TIMEOUT);

    let mut kill_port_uids = Vec::new();
    for (i, name) in file.kill_port_users.iter().enumerate() {
        match User::from_name(name) {
            Ok(Some(u)) => kill_port_uids.push(u.uid.as_raw()),
            _ => c.fail(
                &format!("kill_port_users[{i}]"),
                format!("user \"{name}\" does not exist; list existing users who may stop this service through its kill port"),
            ),
        }
    }

    let log_max_bytes = match file.log_max_bytes {
        None => DEFAULT_LOG_MAX_BYTES,
        Some(n) if n >= 1 << 20 => n,
        Some(n) => {
            c.fail("log_max_bytes", format!("{n} is too small; use at least 1048576 (1 MiB); the default is 64 MiB"));
            DEFAULT_LOG_MAX_BYTES
        }
    };
    let log_keep = match file.log_keep {
        None => DEFAULT_LOG_KEEP,
        Some(n) if n <= 100 => n as usize,
        Some(n) => {
            c.fail("log_keep", format!("{n} is out of range; keep 0 to 100 rotated logs (default {DEFAULT_LOG_KEEP})"));
            DEFAULT_LOG_KEEP
        }
    };

    let ready = file.ready.as_ref().and_then(|v| readiness(&mut c, v));
    let ready_timeout = timeout(&mut c, "ready_timeout", file.ready_timeout.as_ref(), DEFAULT_READY_TIMEOUT);

    match (c.problems.is_empty(), user, gid) {
        (true, Some(u), Some(gid)) => Ok(Service {
            name: name.to_string(),
            file: path.to_path_buf(),
            command: file.command,
            uid: u.uid.as_raw(),
            gid,
            supplementary_gids,
            kill_port: file.kill_port,
            working_dir,
            environment,
            criu_config,
            criu_options: file.criu.options,
            stop_timeout,
            restore_stale: file.restore_stale.unwrap_or(false),
            keep_checkpoints,
            on_incompatible,
            dump_timeout,
            restore_timeout,
            kill_port_uids,
            log_max_bytes,
            log_keep,
            ready,
            ready_timeout,
        }),
        _ => Err(ConfigError::Invalid { path: path.to_path_buf(), problems: c.problems }),
    }
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
                    serde_yaml::to_string(v).unwrap_or_default().trim(),
                    crate::time_fmt::human_duration(default)
                ),
            );
            default
        }
    }
}

/// `90s`, `10m`, `1h`, `1h30m` or a plain number of seconds.
pub fn parse_duration(v: &serde_yaml::Value) -> Option<Duration> {
    if let Some(n) = v.as_u64() {
        return Some(Duration::from_secs(n));
    }
    let text = v.as_str()?.trim();
    if text.is_empty() {
        return None;
    }
    let (mut total, mut num) = (0u64, String::new());
    for ch in text.chars() {
        if ch.is_ascii_digit() {
            num.push(ch);
            continue;
        }
        let unit = match ch {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return None,
        };
        total = total.checked_add(num.parse::<u64>().ok()?.checked_mul(unit)?)?;
        num.clear();
    }
    if !num.is_empty() {
        total = total.checked_add(num.parse().ok()?)?;
    }
    Some(Duration::from_secs(total))
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
    use super::parse_duration;
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
    }
}
