//! Taking one checkpoint. A stopping dump is finalized by CRIU's post-dump action hook while the
//! service is frozen, so the service is killed only once the checkpoint is durable; a dump that
//! keeps the service running is finalized after CRIU returns. A failed dump is discarded and
//! its log kept as `last-failed-dump.log`; earlier checkpoints are never touched.

use super::context::Context;
use super::protocol::CheckpointReport;
use crate::criu::{action_hook, CriuError, DumpArgs};
use crate::process::tree;
use crate::store::{DumpKind, Manifest};
use std::time::{Instant, SystemTime};

pub fn take_checkpoint(ctx: &Context, init_pid: i32, kind: DumpKind) -> Result<CheckpointReport, String> {
    // The first line is the summary; CRIU's error lines, if any, follow it.
    dump(ctx, init_pid, kind).map_err(|e| {
        let (summary, details) = e.split_once('\n').map(|(s, d)| (s, format!("\n{d}"))).unwrap_or((&e, String::new()));
        format!("{summary}; the service keeps running and earlier checkpoints are untouched{details}")
    })
}

fn dump(ctx: &Context, init_pid: i32, kind: DumpKind) -> Result<CheckpointReport, String> {
    let _keep_systemd_waiting = super::systemd::extend_while_busy();
    let started = Instant::now();
    let pending = ctx.store.begin().map_err(|e| e.to_string())?;
    let draft = Manifest {
        format: crate::store::manifest_format(),
        id: pending.id.clone(),
        service: ctx.service.name.clone(),
        kind,
        created_at: crate::time_fmt::rfc3339_utc(SystemTime::now()),
        stasis_version: env!("CARGO_PKG_VERSION").to_string(),
        criu_version: ctx.criu.version.clone(),
        init_binary: std::fs::read_link(format!("/proc/{init_pid}/exe")).unwrap_or_else(|_| ctx.init_binary.clone()),
        stdout_pipe_inode: tree::stdout_pipe_inode(init_pid),
        size_bytes: 0,
    };
    if let Err(e) = pending.write_draft(&draft) {
        pending.discard();
        return Err(e.to_string());
    }
    let stopping = kind == DumpKind::Stop;
    let args = DumpArgs {
        pid: init_pid,
        images_dir: pending.images_dir(),
        work_dir: pending.dir.clone(),
        config_file: ctx.service.criu_config.clone(),
        options: ctx.service.criu_options.clone(),
        leave_running: !stopping,
        action_script: stopping.then(|| action_hook::script_for(&ctx.exe)),
    };
    let env: Vec<(&str, String)> =
        if stopping { vec![(action_hook::PENDING_ENV, pending.dir.display().to_string())] } else { Vec::new() };
    let dumped = ctx.criu.dump(&args, &env);

    let checkpoint = match dumped {
        Ok(()) if stopping => pending.finalized().ok_or_else(|| {
            "CRIU reported success but the checkpoint was not finalized by the post-dump hook".to_string()
        }),
        Ok(()) => pending.finalize().map_err(|e| e.to_string()),
        // The hook finalized it and something after that failed: the checkpoint itself is complete.
        Err(_) if pending.finalized().is_some() => Ok(pending.finalized().expect("checked")),
        Err(e) => Err(describe_failed_dump(ctx, &pending, e)),
    };
    match checkpoint {
        Ok(cp) => Ok(CheckpointReport {
            id: cp.id,
            size_bytes: cp.manifest.size_bytes,
            duration: started.elapsed(),
            dir: cp.dir,
        }),
        Err(e) => {
            pending.discard();
            Err(e)
        }
    }
}

fn describe_failed_dump(ctx: &Context, pending: &crate::store::PendingCheckpoint, e: CriuError) -> String {
    // Keep CRIU's log: the pending directory is about to be removed.
    let kept = ctx.paths.failed_dump_log();
    let e = match e {
        CriuError::Failed { action, status, log, errors } => {
            // The checkpoints may be another filesystem (a full one, even): copy when rename can't.
            let moved = std::fs::rename(&log, &kept).is_ok() || std::fs::copy(&log, &kept).is_ok();
            let log = if moved { kept } else { log };
            CriuError::Failed { action, status, log, errors }
        }
        other => other,
    };
    let mut text = e.one_line();
    if let CriuError::Failed { errors, .. } = &e {
        if errors.iter().any(|l| l.contains("No space left") || l.contains("(-28)") || l.contains("Disk quota")) {
            text.push_str(&format!(
                "; the disk holding {} is full: free space or move --state-dir to a larger filesystem",
                pending.dir.parent().map(|p| p.display().to_string()).unwrap_or_default()
            ));
        }
        for line in errors {
            text.push('\n');
            text.push_str(line);
        }
    }
    text
}
