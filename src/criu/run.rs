//! Running criu. Its own stderr is captured and only shown when its log says nothing. A dump
//! runs in its own process group under a deadline: when it passes, criu and its action scripts
//! are killed (the dumped tree, detached from its tracer, runs on).

use super::argv::{RestoreArgs, RESTORE_LOG, RESTORE_PIDFILE};
use super::log_capture;
use super::log_errors::{error_lines, pick};
use super::{Criu, CriuError};
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Debug)]
pub struct RestoreOutcome {
    /// Host PID of the restored tree's root (the namespace init).
    pub pid: i32,
}

impl Criu {
    /// Restores detached; `stdout_pipe` (the write end of the service's new stdout pipe) is
    /// handed to criu under its own number for `--inherit-fd`. `spawned` hears criu's PID (for
    /// progress).
    pub fn restore(
        &self,
        args: &RestoreArgs,
        stdout_pipe: Option<BorrowedFd<'_>>,
        timeout: Duration,
        spawned: &dyn Fn(i32),
    ) -> Result<RestoreOutcome, CriuError> {
        let pidfile = args.work_dir.join(RESTORE_PIDFILE);
        let _ = std::fs::remove_file(&pidfile);
        let fd = stdout_pipe.map(|fd| fd.as_raw_fd());
        let mut cmd = self.command(args.argv(fd));
        // The pipe reaches criu by staying open across its exec (no dup2 in a pre_exec hook: that
        // would make std fork the whole supervisor instead of using posix_spawn, ~5 ms). Only
        // for the spawn: the supervisor starts nothing else meanwhile, and the flag is put back.
        let inherit = fd
            .map(InheritGuard::new)
            .transpose()
            .map_err(|source| CriuError::Spawn { path: self.path.clone(), source })?;
        let inherit = std::cell::Cell::new(inherit);
        let log = args.work_dir.join(RESTORE_LOG);
        cmd.process_group(0);
        let limit = Deadline { after: timeout, setting: "restore_timeout" };
        self.finish(cmd, "restore the checkpoint", &log, Some(limit), &|pid| {
            // Spawned: the pipe is criu's now, and closed again on every later exec of ours.
            drop(inherit.take());
            spawned(pid)
        })?;
        let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
        let _ = std::fs::remove_file(&pidfile);
        match text.trim().parse::<i32>() {
            Ok(pid) if pid > 0 => Ok(RestoreOutcome { pid }),
            _ => Err(CriuError::Failed {
                action: "restore the checkpoint",
                status: "exit 0".into(),
                log,
                errors: vec![format!("criu left no usable pidfile at {}", pidfile.display())],
            }),
        }
    }

    fn command(&self, argv: Vec<OsString>) -> Command {
        let mut cmd = Command::new(&self.path);
        cmd.args(argv)
            // A clean environment: nothing of the caller's (CRIU_CONFIG_FILE would add a config,
            // LD_PRELOAD would run in root's CRIU, POSIXLY_CORRECT would change how CRIU's
            // getopt reads the options the allowlist judged).
            .env_clear()
            .env("PATH", crate::config::DEFAULT_PATH)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn finish(
        &self,
        mut cmd: Command,
        action: &'static str,
        log: &Path,
        limit: Option<Deadline>,
        spawned: &dyn Fn(i32),
    ) -> Result<(), CriuError> {
        let mut child = cmd.spawn().map_err(|source| CriuError::Spawn { path: self.path.clone(), source })?;
        tracing::debug!("criu: spawned");
        spawned(child.id() as i32);
        let stdout = child.stdout.take().expect("stdout is piped");
        // Best effort: a smaller pipe only means more wake-ups.
        // SAFETY: F_SETPIPE_SZ on a pipe fd we own.
        unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, log_capture::PIPE_SIZE) };
        let capture = log_capture::spawn(stdout, log.to_path_buf());
        let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut stderr_pipe).take(STDERR_CAP).read_to_end(&mut buf);
            // Drain the rest unread so criu never blocks on a full pipe.
            let _ = std::io::copy(&mut stderr_pipe, &mut std::io::sink());
            buf
        });
        if let Some(Deadline { after, setting }) = limit {
            if !crate::process::tree::exits_within(child.id() as i32, after) {
                kill_run(&child);
                let _ = child.wait();
                capture.finish(LOG_DRAIN);
                return Err(CriuError::TimedOut { action, setting, after, log: log.to_path_buf() });
            }
        }
        let status = child.wait().map_err(|source| CriuError::Spawn { path: self.path.clone(), source })?;
        tracing::debug!("criu: exited");
        let recent = capture.finish(LOG_DRAIN);
        tracing::debug!("criu: log captured");
        let stderr = reader.join().unwrap_or_default();
        tracing::debug!("criu: stderr read");
        if status.success() {
            return Ok(());
        }
        // From memory first: the disk may be full and the file short of its end.
        let mut errors = pick(&String::from_utf8_lossy(&recent));
        if errors.is_empty() {
            errors = error_lines(log);
        }
        if errors.is_empty() {
            let stderr = String::from_utf8_lossy(&stderr);
            errors = stderr.lines().rev().take(8).map(str::to_string).collect::<Vec<_>>().into_iter().rev().collect();
        }
        Err(CriuError::Failed { action, status: status.to_string(), log: log.to_path_buf(), errors })
    }
}

/// A limit on how long criu may run, and the setting that sets it (for the message).
#[derive(Clone, Copy)]
struct Deadline {
    after: Duration,
    setting: &'static str,
}

/// How much of criu's own stderr is kept (its log is separate).
const STDERR_CAP: u64 = 64 * 1024;
/// How long to wait for the rest of the log once criu has exited.
const LOG_DRAIN: Duration = Duration::from_secs(5);

/// Kills a criu that ran out of time: first the trees it was creating (each is the init of its own
/// PID namespace, so killing it ends the namespace), then criu's own process group (criu and the
/// action scripts it started).
fn kill_run(child: &Child) {
    let criu = child.id() as i32;
    for pid in crate::process::tree::children_of(criu) {
        crate::process::tree::kill_if_child_of(pid, criu, libc::SIGKILL);
    }
    // SAFETY: the group is criu's own (process_group(0)) and criu is our unreaped child, so the
    // id cannot have been reused.
    unsafe { libc::kill(-criu, libc::SIGKILL) };
}

/// Clears FD_CLOEXEC on a descriptor until dropped.
struct InheritGuard(i32);

impl InheritGuard {
    fn new(fd: i32) -> std::io::Result<InheritGuard> {
        // SAFETY: fcntl on a descriptor the caller borrows for the guard's lifetime.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(InheritGuard(fd))
    }
}

impl Drop for InheritGuard {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::fcntl(self.0, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}
