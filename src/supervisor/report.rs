//! The one place that tells what happened to the service: its status record, its counters and
//! the metrics file, systemd's notifications, and the notes about it in the service log. The
//! supervisor's run ([`Reporter`]) and the event loop ([`RunReport`], one run's) call it; nothing
//! else writes those.

use super::log_pump::LogWriter;
use super::outcome::Outcome;
use super::probation::main_pid;
use super::ready::{Notifier, StartReport};
use super::state::State;
use super::status::{ServiceState, StartedFrom, StatusRecord};
use crate::engine::dump::CheckpointReport;
use crate::engine::restore::lazy_start::TransferStatus;
use crate::engine::restore::{StartInfo, StartProgress};
use crate::engine::Job;
use crate::store::DumpKind;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The reports of this supervisor's runs of the service (a clone reports to the same).
#[derive(Clone)]
pub struct Reporter {
    ctx: Arc<Job>,
    log: LogWriter,
    /// Restarts so far, for the status record.
    restarts: Arc<AtomicU32>,
    /// The record last written, which a later figure (the first answer, the lazy transfer's
    /// progress) is added to.
    last: Arc<Mutex<Option<StatusRecord>>>,
}

impl Reporter {
    pub fn new(ctx: Arc<Job>, log: LogWriter) -> Reporter {
        Reporter { ctx, log, restarts: Arc::new(AtomicU32::new(0)), last: Arc::new(Mutex::new(None)) }
    }

    /// The service log, for notes of the caller's own.
    pub fn log(&self) -> &LogWriter {
        &self.log
    }

    /// The one writer of the status record.
    fn status(&self, state: ServiceState, started: Option<&StartInfo>, message: Option<String>) {
        let _ = self.write(self.record(state, started, message));
    }

    fn write(&self, record: StatusRecord) -> Result<(), crate::store::StoreError> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let written = record.write(&self.ctx.paths);
        *last = Some(record);
        written
    }

    /// Adds where a lazy transfer is to the record last written; the metrics follow.
    pub fn transfer(&self, lazy: TransferStatus) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let Some(record) = last.as_mut() else { return };
        record.lazy_restore = Some(lazy);
        let _ = record.write(&self.ctx.paths);
        drop(last);
        super::metrics::write_file(&self.ctx.dirs, &self.ctx.host);
    }

    fn record(&self, state: ServiceState, started: Option<&StartInfo>, message: Option<String>) -> StatusRecord {
        StatusRecord {
            name: self.ctx.service.name.clone(),
            state,
            init_pid: started.map(|s| s.init_pid.as_raw()).filter(|_| state.is_up()),
            supervisor_pid: Some(std::process::id()),
            started_from: started.map(|s| s.started_from),
            restored_checkpoint: started.and_then(|s| s.checkpoint.clone()),
            fallback_reason: started.and_then(|s| s.fallback_reason.clone()),
            since: crate::time_fmt::rfc3339_utc(SystemTime::now()),
            message,
            restore_ms: started.and_then(|s| s.restore_ms),
            restarts: self.restarts.load(Ordering::Relaxed),
            // Said once, after the readiness probe: kept by the later records of the same run.
            first_answer_ms: self
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .filter(|r| started.is_some_and(|s| r.init_pid == Some(s.init_pid.as_raw())))
                .and_then(|r| r.first_answer_ms),
            // Kept while the run that was restored lazily goes on.
            lazy_restore: started
                .filter(|_| state.is_up())
                .and_then(|s| s.checkpoint.as_ref())
                .and_then(|_| crate::engine::restore::lazy_start::transfer())
                .filter(|t| started.and_then(|s| s.checkpoint.as_ref()) == Some(&t.checkpoint)),
        }
    }

    /// The reports of one run of the service, started as `started` says.
    pub fn run<'a>(&'a self, started: &'a StartInfo) -> RunReport<'a> {
        RunReport { to: self, started }
    }

    /// Keeps systemd from timing out while a dump or a start is under way (until dropped).
    pub fn busy(&self) -> super::systemd::Extender {
        super::systemd::extend_while_busy()
    }

    /// How a start goes: a wait for a restore slot to systemd; a `Progress: ` line to `start`
    /// (`notifier`: the first start's, which someone waits on) and systemd, and to nobody on a
    /// restart (None).
    pub fn start_progress(&self, p: StartProgress, notifier: Option<&Notifier>) {
        match (p, notifier) {
            (StartProgress::Line(line), Some(n)) => {
                n.progress(&line);
                super::systemd::status(line.trim_start_matches(super::protocol::PROGRESS_PREFIX));
            }
            (StartProgress::Line(_), None) => {}
            (StartProgress::Queued(line), _) => super::systemd::status(&line),
        }
    }

    /// A start (or a readiness wait) failed: `message` says why, whole.
    pub fn start_failed(&self, message: &str) {
        self.log.note(message);
        self.status(ServiceState::Failed, None, Some(message.to_string()));
    }

    /// What a run that started reports, in this order, so that what `start` hears is already so
    /// on disk, in nftables and in the metrics: the status, retention and stale network locks,
    /// the counters, then the start report.
    pub fn started(
        &self,
        notifier: &mut Notifier,
        started: &StartInfo,
        first: bool,
        first_answer_ms: Option<u64>,
    ) -> Result<(), crate::store::StoreError> {
        let ctx = &self.ctx;
        self.announce(started, first);
        let mut record = self.record(ServiceState::Running, Some(started), None);
        record.first_answer_ms = first_answer_ms;
        self.write(record)?;
        tracing::debug!("supervisor: status written");
        for n in crate::engine::retention::apply(ctx) {
            self.log.note(&n);
        }
        crate::engine::retention::release_stale_locks(ctx, started.checkpoint.as_deref());
        crate::store::counters::bump(&ctx.paths.root, |c| {
            match started.started_from {
                StartedFrom::Checkpoint => c.restores += 1,
                StartedFrom::Cold => c.cold_starts += 1,
            }
            if started.fallback_reason.is_some() {
                c.restore_fallbacks += 1;
            }
            if !first {
                c.restarts += 1;
            }
        });
        super::metrics::write_file(&ctx.dirs, &ctx.host);
        tracing::debug!("supervisor: reporting");
        let pid = main_pid(started.init_pid).unwrap_or(started.init_pid.as_raw());
        notifier.send(&StartReport {
            ok: true,
            pid: Some(pid),
            started_from: Some(started.started_from),
            checkpoint: started.checkpoint.clone(),
            fallback_reason: started.fallback_reason.clone(),
            error: None,
            exit_code: None,
            warnings: started.notes.clone(),
        });
        Ok(())
    }

    /// Says in the log (and to systemd) how this run of the service began.
    fn announce(&self, started: &StartInfo, first: bool) {
        let pid = main_pid(started.init_pid).unwrap_or(started.init_pid.as_raw());
        let how = match (&started.started_from, &started.fallback_reason) {
            (StartedFrom::Checkpoint, _) => {
                format!("restored from checkpoint {}", started.checkpoint.as_deref().unwrap_or("?"))
            }
            (StartedFrom::Cold, Some(why)) => format!("cold start because {why}"),
            (StartedFrom::Cold, None) => "cold start (no checkpoint)".to_string(),
        };
        let how = if first { how } else { format!("restarted: {how}") };
        self.log.note(&how);
        for n in &started.notes {
            self.log.note(&format!("warning: {n}"));
        }
        super::systemd::ready(&format!("{how}; pid {pid}"));
    }

    /// The service exited and `restart:` gives up on it (`message` says why).
    pub fn gave_up(&self, message: &str) {
        self.log.note(message);
        self.status(ServiceState::Failed, None, Some(message.to_string()));
    }

    /// The service exited and comes back after a while (`message` says when).
    pub fn restarting(&self, message: String) {
        self.log.note(&message);
        self.status(ServiceState::Restarting, None, Some(message));
        super::systemd::status("restarting");
    }

    /// A restart is about to start the service again.
    pub fn restart_begins(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// A restart did not get the service running.
    pub fn restart_failed(&self, e: &super::StartError) {
        self.log.note(&format!("failed to restart: {e}"));
    }

    /// Stopped while it waited to restart the service.
    pub fn stopped_waiting(&self, why: &str) {
        self.log.note(why);
        self.status(ServiceState::Stopped, None, Some(why.to_string()));
    }

    /// The supervisor is about to exit, for the reason `message` says.
    pub fn exiting(&self, message: &str) {
        self.log.note(&format!("supervisor exiting: {message}"));
        super::systemd::stopping(message);
    }

    /// The supervisor let go of its service: the metrics say so.
    pub fn ended(&self) {
        super::metrics::write_file(&self.ctx.dirs, &self.ctx.host);
    }
}

/// The event loop's reports of one run: the status record, the counters and metrics file,
/// systemd's status line and the log's notes, each outcome in one place.
pub struct RunReport<'a> {
    to: &'a Reporter,
    started: &'a StartInfo,
}

impl RunReport<'_> {
    /// Keeps systemd from timing out while a dump is under way (until dropped).
    pub fn busy(&self) -> super::systemd::Extender {
        self.to.busy()
    }

    pub fn state_changed(&self, state: State, message: Option<&str>) {
        let s = match state {
            State::Stopped => ServiceState::Stopped,
            State::Failed => ServiceState::Failed,
            State::Checkpointing { .. } => ServiceState::Checkpointing,
            _ => ServiceState::Running,
        };
        self.to.status(s, Some(self.started), message.map(str::to_string));
    }

    pub fn terminate_requested(&self) {
        self.to.log.note("stop without a checkpoint requested (stasis stop --no-checkpoint)");
    }

    /// The dump waits for its place in the host's queue.
    pub fn queued(&self, line: &str) {
        self.to.log.note(line);
        super::systemd::status(line);
        self.to.status(ServiceState::Queued, Some(self.started), None);
    }

    pub fn dumping(&self) {
        self.to.status(ServiceState::Checkpointing, Some(self.started), None);
    }

    pub fn progress(&self, line: &str) {
        super::systemd::status(line);
    }

    pub fn periodic_skipped(&self, why: &str) {
        let ctx = &self.to.ctx;
        self.to.log.note(&format!(
            "periodic checkpoint skipped: {why}; the service keeps running and the previous checkpoint is kept"
        ));
        crate::store::counters::bump(&ctx.paths.root, |c| c.periodic_skipped += 1);
        super::metrics::write_file(&ctx.dirs, &ctx.host);
    }

    pub fn dump_started(&self, kind: DumpKind) {
        self.to.log.note(match kind {
            DumpKind::Stop => "checkpoint requested through the kill port: dumping, then stopping",
            DumpKind::KeepRunning => "checkpoint requested: dumping, the service keeps running",
            DumpKind::Periodic => "periodic checkpoint (checkpoint_every): dumping, the service keeps running",
        });
        super::systemd::status("saving a checkpoint");
    }

    pub fn dry_run_started(&self) {
        self.to.log.note("doctor: a dry-run dump (the service keeps running; nothing is kept)");
    }

    /// `called_off`: a stop its silent client called off, a refusal the gate logged as one.
    pub fn dump_finished(&self, outcome: &Outcome, called_off: bool) {
        let ctx = &self.to.ctx;
        let dry = outcome.as_ref().is_ok_and(|r| r.dry);
        // A dry run is not a checkpoint, and its failure is what was asked about.
        crate::store::counters::bump(&ctx.paths.root, |c| {
            if dry || called_off {
                return;
            }
            if outcome.is_ok() {
                c.checkpoints += 1
            } else {
                c.checkpoint_failures += 1
            }
        });
        super::metrics::write_file(&ctx.dirs, &ctx.host);
        match outcome {
            Ok(r) if r.dry => super::systemd::status("doctor: a checkpoint would work now"),
            Ok(r) => super::systemd::status(&format!("checkpoint {} saved", r.id)),
            Err(_) if called_off => super::systemd::status("running: a stop through the kill port was called off"),
            Err(e) => super::systemd::status(&format!("checkpoint failed: {}", e.summary())),
        }
        match outcome {
            Ok(r) if r.dry => self
                .to
                .log
                .note(&format!("doctor: a checkpoint would work now ({} bytes dumped, thrown away)", r.size_bytes)),
            Ok(r) => self.checkpoint_saved(r),
            Err(_) if called_off => {}
            Err(e) => self.to.log.note(&format!("checkpoint failed: {e}")),
        }
    }

    fn checkpoint_saved(&self, r: &CheckpointReport) {
        let (ctx, log) = (&self.to.ctx, &self.to.log);
        // Before anyone hears of it: `gc` deletes only tables recorded as ours.
        if let Err(e) = crate::criu::network_lock::record_owner(
            &ctx.dirs.state_dir,
            &ctx.service.name,
            &r.id,
            &r.dir.join(crate::criu::DUMP_LOG),
        ) {
            log.note(&format!("warning: {e}; `stasis gc` will not delete its table"));
        }
        log.note(&format!("checkpoint {} saved ({} bytes) in {}", r.id, r.size_bytes, r.dir.display()));
        for n in &r.notes {
            log.note(n);
        }
        if let (Some(max), Some(froze)) = (ctx.service.max_freeze, r.freeze) {
            if froze > max {
                log.note(&format!(
                    "warning: checkpoint {} froze the service for {} ms, more than max_freeze_ms ({} ms)",
                    r.id,
                    froze.as_millis(),
                    max.as_millis()
                ));
                crate::store::counters::bump(&ctx.paths.root, |c| c.freeze_over_budget += 1);
            }
        }
    }

    pub fn terminating(&self) {
        super::systemd::stopping("stopping without a checkpoint");
        self.to.log.note(&format!(
            "stopping without a checkpoint: SIGTERM, SIGKILL after {} s",
            self.to.ctx.service.stop_timeout.as_secs()
        ));
    }

    pub fn killing(&self) {
        self.to.log.note("grace period over: SIGKILL");
    }

    pub fn output_cut_short(&self) {
        self.to.log.note("the service's output did not reach EOF in time; some of its last lines may be missing");
    }
}
