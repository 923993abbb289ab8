//! `stasis status` and `stasis list`: the supervisor's last record, checked against whether a
//! supervisor actually holds the lock, plus the latest good checkpoint from the store.

use super::error::Error;
use super::exit_codes;
use super::output::print_json;
use crate::config::{discover, load_named, load_service, service_name_from_path};
use crate::paths::Dirs;
use crate::process::tree;
use crate::store::CheckpointStore;
use crate::supervisor::lock;
use crate::supervisor::status::{ServiceState, StartedFrom, StatusRecord};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub name: String,
    pub state: ServiceState,
    /// Host PID of the service's main process.
    pub pid: Option<i32>,
    pub started_from: Option<StartedFrom>,
    /// The latest good checkpoint.
    pub checkpoint: Option<String>,
    /// Whether that checkpoint is fresh (the service has not run since): the next start restores
    /// it (unless it does not fit the program). Null without a checkpoint.
    pub checkpoint_fresh: Option<bool>,
    /// Figures of that checkpoint: freeze_ms, dump_ms, fsync_ms, restore_ms, pages, bytes_written.
    pub checkpoint_timings: Option<crate::store::Timings>,
    /// How long the restore of the current (or last) run took; null after a cold start.
    pub restore_ms: Option<u64>,
    /// From the start of the current run to its first answer to the readiness probe (`ready:`).
    pub first_answer_ms: Option<u64>,
    /// A lazy restore's transfer (`restore: lazy`): state, pages_in, pages_total, pages_left,
    /// mib_per_s, and complete_ms once every page is in. Null when not restored lazily.
    pub lazy_restore: Option<crate::engine::restore::lazy_start::TransferStatus>,
    pub fallback_reason: Option<String>,
    pub restored_checkpoint: Option<String>,
    pub init_pid: Option<i32>,
    pub supervisor_pid: Option<u32>,
    pub kill_port: Option<u16>,
    pub since: Option<String>,
    pub message: Option<String>,
    /// How often the supervisor brought the service back after it exited (`restart:`).
    pub restarts: u32,
    /// Set when the service file itself is invalid.
    pub config_error: Option<String>,
}

pub fn view(dirs: &Dirs, name: &str, kill_port: Option<u16>, config_error: Option<String>) -> StatusView {
    let paths = dirs.service(name);
    let record = StatusRecord::read(&paths);
    let supervisor = lock::holder(&paths.lock);
    let (mut state, mut message) = match &record {
        Some(r) => (r.state, r.message.clone()),
        None => (ServiceState::Stopped, None),
    };
    if supervisor.is_none() && (state.is_up() || state == ServiceState::Restarting) {
        state = ServiceState::Failed;
        message = Some("the supervisor exited unexpectedly (see supervisor.log in the service's state dir)".into());
    }
    let running = state.is_up();
    let init_pid = record.as_ref().and_then(|r| r.init_pid).filter(|_| running);
    let store = CheckpointStore::new(&paths);
    let latest = store.latest().ok().flatten();
    let checkpoint_fresh = latest.as_ref().map(|c| {
        store.generations().freshness(c.manifest.generation, c.manifest.kind) == crate::store::Freshness::Fresh
    });
    let checkpoint_timings = latest.as_ref().and_then(|c| c.manifest.timings.clone());
    let checkpoint = latest.map(|c| c.id);
    StatusView {
        name: name.to_string(),
        state,
        pid: init_pid.map(|p| tree::main_pid(p).unwrap_or(p)),
        started_from: record.as_ref().and_then(|r| r.started_from),
        checkpoint,
        checkpoint_fresh,
        checkpoint_timings,
        restore_ms: record.as_ref().and_then(|r| r.restore_ms),
        first_answer_ms: record.as_ref().and_then(|r| r.first_answer_ms).filter(|_| running),
        lazy_restore: record.as_ref().and_then(|r| r.lazy_restore.clone()).filter(|_| running),
        fallback_reason: record.as_ref().and_then(|r| r.fallback_reason.clone()),
        restored_checkpoint: record.as_ref().and_then(|r| r.restored_checkpoint.clone()),
        init_pid,
        supervisor_pid: supervisor.as_deref().and_then(|p| p.parse().ok()),
        kill_port,
        since: record.as_ref().map(|r| r.since.clone()),
        message,
        restarts: record.as_ref().map_or(0, |r| r.restarts),
        config_error,
    }
}

pub fn run(dirs: &Dirs, name: Option<&str>, json: bool) -> Result<i32, Error> {
    // The state directory is root-only: without root every service would look stopped.
    super::require_root()?;
    if let Some(name) = name {
        let service = load_named(dirs, name)?;
        let v = view(dirs, &service.name, Some(service.kill_port), None);
        if json {
            print_json(&v);
        } else {
            print_one(&v);
        }
        return Ok(exit_codes::OK);
    }
    let mut views = Vec::new();
    for path in discover(dirs)? {
        let Ok(name) = service_name_from_path(&path) else {
            continue;
        };
        let v = match load_service(dirs, &path.display().to_string()) {
            Ok(s) => view(dirs, &name, Some(s.kill_port), None),
            Err(e) => view(dirs, &name, None, Some(e.to_string())),
        };
        views.push(v);
    }
    if json {
        print_json(&views);
        return Ok(exit_codes::OK);
    }
    if views.is_empty() {
        println!("no services in {} (add NAME.yaml files there)", dirs.config_dir.display());
        return Ok(exit_codes::OK);
    }
    println!("{:<20} {:<13} {:>8} {:<11} {:<30} KILL PORT", "NAME", "STATE", "PID", "FROM", "CHECKPOINT");
    for v in &views {
        println!(
            "{:<20} {:<13} {:>8} {:<11} {:<30} {}",
            v.name,
            state_word(v.state),
            v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            v.started_from.map(from_word).unwrap_or("-"),
            v.checkpoint.as_deref().unwrap_or("-"),
            v.kill_port.map(|p| p.to_string()).unwrap_or_else(|| "invalid config".into()),
        );
    }
    Ok(exit_codes::OK)
}

fn state_word(s: ServiceState) -> &'static str {
    match s {
        ServiceState::Running => "running",
        ServiceState::Queued => "queued",
        ServiceState::Checkpointing => "checkpointing",
        ServiceState::Stopped => "stopped",
        ServiceState::Failed => "failed",
        ServiceState::Restarting => "restarting",
    }
}

fn from_word(s: StartedFrom) -> &'static str {
    match s {
        StartedFrom::Checkpoint => "checkpoint",
        StartedFrom::Cold => "cold",
    }
}

fn print_one(v: &StatusView) {
    match (v.state, v.pid) {
        (ServiceState::Running, Some(pid)) => println!("{}: running (pid {pid})", v.name),
        (s, _) => println!("{}: {}", v.name, state_word(s)),
    }
    if let Some(from) = v.started_from {
        match (from, &v.restored_checkpoint) {
            (StartedFrom::Checkpoint, Some(id)) => println!("  started from: checkpoint {id}"),
            _ => println!("  started from: {}", from_word(from)),
        }
    }
    let timings: Vec<String> = [("restore", v.restore_ms), ("first answer", v.first_answer_ms)]
        .into_iter()
        .filter_map(|(what, ms)| Some(format!("{what} {ms} ms", ms = ms?)))
        .collect();
    if !timings.is_empty() {
        println!("  start took: {}", timings.join(", "));
    }
    if let Some(t) = &v.lazy_restore {
        println!("  lazy restore: {}", transfer_line(t));
    }
    if let Some(why) = &v.fallback_reason {
        println!("  fell back to a cold start: {}", crate::text::escape_lines(why));
    }
    match (&v.checkpoint, v.checkpoint_fresh) {
        (Some(id), Some(true)) => println!("  latest checkpoint: {id} (fresh: the next start restores it)"),
        (Some(id), _) => {
            println!("  latest checkpoint: {id} (stale: the service ran since; see `stasis checkpoints {}`)", v.name)
        }
        (None, _) => println!("  latest checkpoint: none"),
    }
    if let Some(p) = v.kill_port {
        println!("  kill port: 127.0.0.1:{p}");
    }
    if v.restarts > 0 {
        println!("  restarts: {} (restart:)", v.restarts);
    }
    if let Some(m) = &v.message {
        println!(
            "  last event: {}{}",
            crate::text::escape_lines(m),
            v.since.as_deref().map(|s| format!(" ({s})")).unwrap_or_default()
        );
    }
}

/// Where a lazy restore's transfer is, in one line.
fn transfer_line(t: &crate::engine::restore::lazy_start::TransferStatus) -> String {
    use crate::engine::restore::lazy_start::TransferState;
    let mib = |pages: u64| pages as f64 * 4096.0 / f64::from(1 << 20);
    match t.state {
        TransferState::Transferring => format!(
            "{:.0}% in ({:.0} of {:.0} MiB, {} pages left, {} MiB/s)",
            100.0 * t.pages_in as f64 / t.pages_total.max(1) as f64,
            mib(t.pages_in),
            mib(t.pages_total),
            t.pages_left,
            t.mib_per_s
        ),
        TransferState::Complete => format!(
            "every page in ({:.0} MiB) {} ms after the restore began, {} MiB/s",
            mib(t.pages_in),
            t.complete_ms.unwrap_or(0),
            t.mib_per_s
        ),
        TransferState::Failed => {
            format!(
                "failed after {} of {} pages; the service was cold-started (see its log)",
                t.pages_in, t.pages_total
            )
        }
    }
}
