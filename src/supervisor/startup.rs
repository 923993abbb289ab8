//! Restore-or-cold start. The newest checkpoint is restored; if that fails, it is quarantined
//! (with CRIU's log) and the service is cold-launched, with the reason kept for `status`.

use super::context::Context;
use super::status::StartedFrom;
use crate::criu::RestoreArgs;
use crate::error::Error;
use crate::process::{cold_launch, tree, LaunchSpec};
use nix::unistd::Pid;
use std::os::fd::{AsFd, OwnedFd};

pub struct Started {
    pub info: StartInfo,
    /// Read end of the service's stdout/stderr pipe.
    pub output: OwnedFd,
}

pub struct StartInfo {
    pub init_pid: Pid,
    pub started_from: StartedFrom,
    pub checkpoint: Option<String>,
    pub fallback_reason: Option<String>,
}

pub fn start_service(ctx: &Context) -> Result<Started, Error> {
    let _keep_systemd_waiting = super::systemd::extend_while_busy();
    ctx.store.remove_incomplete();
    let mut fallback_reason = None;
    if let Some(newest) = ctx.store.list()?.pop() {
        let attempt = match newest.manifest {
            Err(e) => Err(format!("its manifest is unreadable ({e})")),
            Ok(manifest) => {
                let cp = crate::store::Checkpoint { id: newest.id.clone(), dir: newest.dir.clone(), manifest };
                restore(ctx, &cp)
            }
        };
        match attempt {
            Ok(started) => return Ok(started),
            Err(why) => {
                // One line for status; the quarantine keeps CRIU's error lines too.
                let (summary, details) = why.split_once('\n').unwrap_or((&why, ""));
                let reason = format!("restore of checkpoint {} failed: {summary}", newest.id);
                let moved = ctx.store.quarantine(&newest.id, &format!("{reason}\n{details}"))?;
                // It will never be restored, so nothing will remove its network lock otherwise.
                crate::criu::network_lock::release(&moved.join(crate::criu::DUMP_LOG));
                fallback_reason = Some(format!("{reason}; quarantined it in {}", moved.display()));
            }
        }
    }
    cold(ctx, fallback_reason)
}

fn restore(ctx: &Context, cp: &crate::store::Checkpoint) -> Result<Started, String> {
    let init = &cp.manifest.init_binary;
    if !init.is_file() {
        return Err(format!("the namespace init it was taken with, {}, is missing", init.display()));
    }
    let (output, stdout_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("failed to create a pipe: {e}"))?;
    let args = RestoreArgs {
        images_dir: cp.images_dir(),
        work_dir: cp.dir.clone(),
        config_file: ctx.service.criu_config.clone(),
        options: ctx.service.criu_options.clone(),
        stdout_pipe_inode: cp.manifest.stdout_pipe_inode,
    };
    let outcome = ctx.criu.restore(&args, Some(stdout_w.as_fd())).map_err(|e| match &e {
        crate::criu::CriuError::Failed { errors, .. } => format!("{}\n{}", e.one_line(), errors.join("\n")),
        _ => e.one_line(),
    })?;
    drop(stdout_w);
    let pid = Pid::from_raw(outcome.pid);
    // The restored root must be our child (we are its subreaper), or we could not supervise it.
    let parent = procfs::process::Process::new(outcome.pid).ok().and_then(|p| p.stat().ok()).map(|s| s.ppid);
    if parent != Some(std::process::id() as i32) {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        return Err(format!(
            "the restored process {} is not a child of the supervisor (parent {parent:?})",
            outcome.pid
        ));
    }
    Ok(Started {
        info: StartInfo {
            init_pid: pid,
            started_from: StartedFrom::Checkpoint,
            checkpoint: Some(cp.id.clone()),
            fallback_reason: None,
        },
        output,
    })
}

fn cold(ctx: &Context, fallback_reason: Option<String>) -> Result<Started, Error> {
    let (output, stdout_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(crate::process::LaunchError::Pipe)?;
    let s = &ctx.service;
    let spec = LaunchSpec {
        init_binary: ctx.init_binary.clone(),
        init_dir: ctx.paths.root.clone(),
        uid: s.uid,
        gid: s.gid,
        groups: s.supplementary_gids.clone(),
        working_dir: s.working_dir.clone(),
        command: s.command.clone(),
        environment: s.environment.clone(),
    };
    let init_pid = cold_launch(&spec, stdout_w.as_fd())?;
    drop(stdout_w);
    Ok(Started {
        info: StartInfo { init_pid, started_from: StartedFrom::Cold, checkpoint: None, fallback_reason },
        output,
    })
}

/// Host PID of the service's main process, for status and the start report.
pub fn main_pid(init_pid: Pid) -> Option<i32> {
    tree::main_pid(init_pid.as_raw())
}
