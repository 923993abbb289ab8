//! `stasis restart NAME [--cold]`: a stop then a start. By default the stop takes a checkpoint
//! and the start restores it, so the service keeps its memory; if the checkpoint fails the
//! service keeps running and is not restarted. `--cold` stops without a checkpoint (SIGTERM,
//! SIGKILL after the grace period) and starts with fresh memory, whatever checkpoints exist.

use super::error::Error;
use super::exit_codes;
use super::output::print_json;
use super::stop::{stop_one, StopOutcome};
use super::terminate::{stop_without_checkpoint, Terminated};
use super::verb_error::VerbError;
use crate::config::load_named;
use crate::criu::Criu;
use crate::paths::Dirs;

pub fn run(dirs: &Dirs, name: &str, cold: bool, json: bool) -> Result<i32, VerbError> {
    super::require_root()?;
    let service = load_named(dirs, name).map_err(Error::from)?;
    Criu::get_cached(&dirs.criu_version_cache()).map_err(Error::from)?;
    let (was_running, checkpoint) = if cold {
        match stop_without_checkpoint(dirs, &service, !json)? {
            Terminated::AlreadyStopped => (false, None),
            Terminated::Stopped { .. } => (true, None),
        }
    } else {
        match stop_one(dirs, &service, !json)? {
            StopOutcome::AlreadyStopped => (false, None),
            StopOutcome::Checkpointed { id, .. } => (true, id),
            StopOutcome::Failed { error, .. } => {
                return Err(Error::CheckpointFailed(format!(
                    "failed to checkpoint {}: {error}; it was not restarted (use `stasis restart {} --cold` to restart it without its memory)",
                    service.name, service.name
                ))
                .into())
            }
        }
    };
    if !was_running && !json {
        println!("{} was not running; starting it", service.name);
    }
    let shown = super::output::ProgressLines::new(json);
    let report = super::start::start_one(dirs, &service, None, cold, &|line| shown.show(line));
    shown.finish();
    let report = report?;
    if json {
        print_json(&serde_json::json!({
            "name": service.name,
            "stopped": { "checkpoint": checkpoint, "cold": cold, "was_running": was_running },
            "start": report,
        }));
    }
    if !report.ok {
        if !json {
            let msg = report.error.clone().unwrap_or_else(|| "unknown error".into());
            eprintln!("stasis: error: failed to start {} again: {}", service.name, crate::text::escape_lines(&msg));
        }
        return Ok(report.exit_code.unwrap_or(exit_codes::START_FAILED));
    }
    if json {
        return Ok(exit_codes::OK);
    }
    println!(
        "{} restarted (pid {}): {}",
        service.name,
        report.pid.map(|p| p.to_string()).unwrap_or("?".into()),
        super::start::how(&report)
    );
    if let Some(why) = &report.fallback_reason {
        eprintln!("stasis: warning: {}", crate::text::escape_lines(why));
    }
    for w in &report.warnings {
        eprintln!("stasis: warning: {}", crate::text::escape_lines(w));
    }
    Ok(exit_codes::OK)
}
