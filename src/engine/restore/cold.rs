//! The cold start: the command launched afresh into new namespaces (process::cold_launch), with
//! the socket a `ready: notify` service reports to.

use super::{StartError, StartInfo, Started, StartedFrom};
use crate::engine::Job;
use crate::process::{cold_launch, LaunchSpec, NotifySocket};
use std::os::fd::AsFd;

/// Launches the command afresh; `fallback_reason` says why no checkpoint was restored.
pub(super) fn start(ctx: &Job, fallback_reason: Option<String>) -> Result<Started, StartError> {
    let (output, stdout_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(crate::process::LaunchError::Pipe)?;
    let s = &ctx.service;
    let notify = match s.ready {
        Some(crate::config::Readiness::Notify) => Some(NotifySocket::bind(&s.name).map_err(StartError::NotifySocket)?),
        _ => None,
    };
    let mut environment = s.environment.clone();
    if let Some(n) = &notify {
        environment.retain(|(k, _)| k != "NOTIFY_SOCKET");
        environment.push(("NOTIFY_SOCKET".into(), n.address.clone()));
    }
    let spec = LaunchSpec {
        init_binary: ctx.init_binary.clone(),
        init_dir: ctx.paths.root.clone(),
        uid: s.uid,
        gid: s.gid,
        groups: s.supplementary_gids.clone(),
        working_dir: s.working_dir.clone(),
        command: s.command.clone(),
        environment,
    };
    let before = ctx.store.record_run("cold start")?;
    let init_pid = match cold_launch(&spec, stdout_w.as_fd()) {
        Ok(pid) => pid,
        Err(e) => {
            // The command never ran, so the checkpoints are as fresh as before.
            let _ = ctx.store.undo_run(&before);
            return Err(e.into());
        }
    };
    drop(stdout_w);
    Ok(Started {
        info: StartInfo {
            init_pid,
            started_from: StartedFrom::Cold,
            checkpoint: None,
            fallback_reason,
            notes: Vec::new(),
            restore_ms: None,
            began: std::time::Instant::now(),
        },
        output,
        notify,
    })
}
