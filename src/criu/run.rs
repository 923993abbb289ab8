//! Running criu. Its own stdout/stderr are captured and only shown when its log says nothing.

use super::argv::{DumpArgs, RestoreArgs, DUMP_LOG, INHERITED_PIPE_FD, RESTORE_LOG, RESTORE_PIDFILE};
use super::log_errors::error_lines;
use super::{Criu, CriuError};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Debug)]
pub struct RestoreOutcome {
    /// Host PID of the restored tree's root (the namespace init).
    pub pid: i32,
}

impl Criu {
    pub fn dump(&self, args: &DumpArgs, env: &[(&str, String)]) -> Result<(), CriuError> {
        let mut cmd = self.command(args.argv());
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.finish(cmd, "dump the service", &args.work_dir.join(DUMP_LOG))
    }

    /// Restores detached; `stdout_pipe` (the write end of the service's new stdout pipe) is
    /// handed to criu as fd 3 for `--inherit-fd`.
    pub fn restore(
        &self,
        args: &RestoreArgs,
        stdout_pipe: Option<BorrowedFd<'_>>,
    ) -> Result<RestoreOutcome, CriuError> {
        let pidfile = args.work_dir.join(RESTORE_PIDFILE);
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = self.command(args.argv());
        if let Some(fd) = stdout_pipe {
            let raw = fd.as_raw_fd();
            // SAFETY: dup2 is async-signal-safe; it runs in the forked child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::dup2(raw, INHERITED_PIPE_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let log = args.work_dir.join(RESTORE_LOG);
        self.finish(cmd, "restore the checkpoint", &log)?;
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
            // Our --config must be the only one in effect.
            .env_remove("CRIU_CONFIG_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn finish(&self, mut cmd: Command, action: &'static str, log: &Path) -> Result<(), CriuError> {
        let out = cmd.output().map_err(|source| CriuError::Spawn { path: self.path.clone(), source })?;
        if out.status.success() {
            return Ok(());
        }
        let mut errors = error_lines(log);
        if errors.is_empty() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            errors = stderr.lines().rev().take(8).map(str::to_string).collect::<Vec<_>>().into_iter().rev().collect();
        }
        Err(CriuError::Failed { action, status: out.status.to_string(), log: log.to_path_buf(), errors })
    }
}
