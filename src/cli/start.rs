//! `stasis start`: runs a supervisor in the background (or the foreground) and returns once the
//! service runs, saying whether it was restored or cold-launched, and why.

use super::error::Error;
use super::exit_codes;
use super::output::print_json;
use crate::config::load_named;
use crate::criu::Criu;
use crate::paths::Dirs;
use crate::store::durable::create_dir_with_mode;
use crate::supervisor::{
    self, lock,
    ready::{Notifier, StartReport, READY_FD_ENV},
    status::{ServiceState, StartedFrom, StatusRecord},
    StartError,
};
use std::io::BufRead;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The fd the background supervisor finds its readiness pipe on.
const CHILD_READY_FD: i32 = 3;
/// How long `start` waits for a supervisor that is finishing a stop.
const FINISHING_WAIT: Duration = Duration::from_secs(30);

pub fn run(
    dirs: &Dirs,
    name: &str,
    from: Option<&str>,
    force: bool,
    foreground: bool,
    json: bool,
) -> Result<i32, super::verb_error::VerbError> {
    super::require_root()?;
    let service = load_named(dirs, name).map_err(Error::from)?;
    Criu::get_cached(&dirs.criu_version_cache()).map_err(Error::from)?;
    if let Some(id) = from {
        if let Some(note) = super::unquarantine::prepare_from(dirs, &service, id, force)? {
            eprintln!("stasis: {}", crate::text::escape_lines(&note));
        }
    }
    if foreground {
        wait_for_finishing(dirs, &service)?;
        return Ok(supervise_here(dirs, service, from.map(str::to_string), false, &mut Notifier::from_env(), true));
    }
    let shown = super::output::ProgressLines::new(json);
    let waits = WaitLines::new(json);
    let report = start_one(dirs, &service, from, false, &|line| {
        if !waits.takes(line, &shown) {
            shown.show(line)
        }
    });
    shown.finish();
    let report = report?;
    if !report.ok {
        let msg = report.error.clone().unwrap_or_else(|| "unknown error".into());
        if json {
            print_json(&report);
        } else {
            eprintln!("stasis: error: {}", crate::text::escape_lines(&msg));
        }
        return Ok(report.exit_code.unwrap_or(exit_codes::START_FAILED));
    }
    if json {
        print_json(&report);
        return Ok(exit_codes::OK);
    }
    println!(
        "{} started (pid {}): {}",
        service.name,
        report.pid.map(|p| p.to_string()).unwrap_or("?".into()),
        how(&report)
    );
    if let Some(why) = &report.fallback_reason {
        eprintln!("stasis: warning: {}", crate::text::escape_lines(why));
    }
    for w in &report.warnings {
        eprintln!("stasis: warning: {}", crate::text::escape_lines(w));
    }
    Ok(exit_codes::OK)
}

/// Where a readiness wait's `Progress: waiting for ...` lines go: the status line on a terminal,
/// stderr when only stderr is one or when STASIS_PROGRESS=1 asks for them, else nowhere (a log
/// or a pipe gets no line a second for the whole `ready_timeout`).
struct WaitLines {
    bar: bool,
    stderr: bool,
}

/// Set to 1: readiness waits are shown on stderr even when it is not a terminal.
pub const PROGRESS_ENV: &str = "STASIS_PROGRESS";

impl WaitLines {
    fn new(json: bool) -> WaitLines {
        use std::io::IsTerminal;
        let asked = std::env::var_os(PROGRESS_ENV).is_some_and(|v| v == "1");
        WaitLines {
            bar: !json && std::io::stdout().is_terminal(),
            stderr: !json && (asked || std::io::stderr().is_terminal()),
        }
    }

    /// Whether `line` was a wait line (shown or dropped here).
    fn takes(&self, line: &str, shown: &super::output::ProgressLines) -> bool {
        if !line.starts_with(crate::supervisor::protocol::WAITING_PREFIX) {
            return false;
        }
        if self.bar {
            shown.show(line);
        } else if self.stderr {
            // From the supervisor, naming the service's own check command: escaped.
            eprintln!(
                "{}",
                crate::text::escape_controls(line.trim_start_matches(crate::supervisor::protocol::PROGRESS_PREFIX))
            );
        }
        true
    }
}

/// "restored from checkpoint ID" or "cold start".
pub fn how(report: &StartReport) -> String {
    match report.started_from {
        Some(StartedFrom::Checkpoint) => {
            format!("restored from checkpoint {}", report.checkpoint.as_deref().unwrap_or("?"))
        }
        _ => "cold start".to_string(),
    }
}

/// Refuses a second supervisor, but waits for one that is only finishing a stop.
fn wait_for_finishing(dirs: &Dirs, service: &crate::config::Service) -> Result<(), Error> {
    let paths = dirs.service(&service.name);
    if let Some(pid) = lock::holder(&paths.lock) {
        // A supervisor that already recorded the service as stopped is only finishing up
        // (draining output): a stop followed at once by a start waits for it instead of failing.
        let finishing =
            StatusRecord::read(&paths).is_some_and(|r| matches!(r.state, ServiceState::Stopped | ServiceState::Failed));
        if finishing {
            lock::wait_released(&paths.lock, FINISHING_WAIT);
        }
        if lock::holder(&paths.lock).is_some() {
            return Err(StartError::AlreadyRunning { service: service.name.clone(), pid }.into());
        }
    }
    Ok(())
}

/// Starts one service's supervisor in the background and returns its report (printing nothing).
/// `progress` hears the supervisor's `Progress: ` lines (a long verification or restore).
/// `cold` restores no checkpoint (`restart --cold`).
pub fn start_one(
    dirs: &Dirs,
    service: &crate::config::Service,
    from: Option<&str>,
    cold: bool,
    progress: &dyn Fn(&str),
) -> Result<StartReport, Error> {
    wait_for_finishing(dirs, service)?;
    let paths = dirs.service(&service.name);
    create_dir_with_mode(&paths.root, 0o700)?;
    let log_path = paths.supervisor_log();
    let open_log = || {
        // Private whatever the caller's umask, and never written through a planted symlink.
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&log_path)
            .map_err(|e| Error::io("open", &log_path, e))
    };
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("create", "a pipe", std::io::Error::from(e)))?;
    let exe = std::env::current_exe().map_err(|e| Error::io("locate", "/proc/self/exe", e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--config-dir")
        .arg(&dirs.config_dir)
        .arg("--state-dir")
        .arg(&dirs.state_dir)
        .arg("--run-dir")
        .arg(&dirs.run_dir)
        .arg("--criu-config-dir")
        .arg(&dirs.criu_config_dir)
        .arg("--host-config")
        .arg(&dirs.host_config)
        .arg("__supervise")
        .arg(&service.name)
        // Root software: the supervisor (and through it CRIU and the init) gets a minimal clean
        // environment, never the caller's.
        .env_clear()
        .env("PATH", crate::config::DEFAULT_PATH)
        .env("LANG", "C.UTF-8")
        .envs(["STASIS_CRIU", "STASIS_LOG"].iter().filter_map(|k| std::env::var_os(k).map(|v| (*k, v))))
        .args(from.map(|id| ["--from", id]).into_iter().flatten())
        .args(cold.then_some("--cold"))
        .env(READY_FD_ENV, CHILD_READY_FD.to_string())
        .stdin(Stdio::null())
        .stdout(open_log()?)
        .stderr(open_log()?);
    let raw = ready_w.as_raw_fd();
    // SAFETY: setsid and dup2 are async-signal-safe; this runs in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            // Its own session: the supervisor must outlive this terminal and this command.
            libc::setsid();
            if libc::dup2(raw, CHILD_READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The supervisor starts clean, whatever the caller's shell had open.
            libc::syscall(libc::SYS_close_range, (CHILD_READY_FD + 1) as u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    tracing::debug!("start: spawning the supervisor");
    cmd.spawn().map_err(|e| Error::io("start the supervisor", "/proc/self/exe", e))?;
    drop(ready_w);
    let mut text = String::new();
    for line in std::io::BufReader::new(std::fs::File::from(ready_r)).lines().map_while(Result::ok) {
        if line.starts_with(crate::supervisor::protocol::PROGRESS_PREFIX) {
            progress(&line);
        } else if !line.trim().is_empty() {
            text = line;
        }
    }
    tracing::debug!("start: report read");
    let report: StartReport = serde_json::from_str(text.trim()).map_err(|_| {
        Error::from(StartError::StartFailed(format!(
            "the supervisor of {} exited before reporting; see {}",
            service.name,
            log_path.display()
        )))
    })?;
    Ok(report)
}

/// The hidden `__supervise` command that `start` runs in the background.
pub fn supervise(dirs: &Dirs, name: &str, from: Option<String>, cold: bool) -> Result<i32, Error> {
    let mut notifier = Notifier::from_env();
    match load_named(dirs, name) {
        Ok(service) => Ok(supervise_here(dirs, service, from, cold, &mut notifier, false)),
        Err(e) => {
            let e = Error::from(e);
            notifier.send(&StartReport::failure(e.to_string(), exit_codes::of(&e)));
            Err(e)
        }
    }
}

/// Runs the supervisor in this process; returns its exit status. A failed start is told to the
/// waiting `start` (with the code it exits with) and to stderr (the journal, or the log).
fn supervise_here(
    dirs: &Dirs,
    service: crate::config::Service,
    from: Option<String>,
    cold: bool,
    notifier: &mut Notifier,
    foreground: bool,
) -> i32 {
    let name = service.name.clone();
    match supervisor::run(dirs.clone(), service, from, cold, notifier, foreground) {
        Ok(ended) => exit_codes::of_ended(ended),
        Err(e) => {
            let code = exit_codes::of_start(&e);
            notifier.send(&StartReport::failure(e.to_string(), code));
            eprintln!("stasis: {name}: {}", crate::text::escape_lines(&e.to_string()));
            code
        }
    }
}
