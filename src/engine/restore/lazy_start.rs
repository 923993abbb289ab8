//! The supervisor's side of a lazy restore (`restore: lazy`, criu::lazy): whether a checkpoint is
//! restored lazily, the lazy-pages daemon set up before CRIU runs, the userfaultfds held at
//! `pre-resume`, and after the start the watch over the transfer. The watch either sees every
//! page in (and lets the references go), or, when the daemon dies, hangs or a chunk does not
//! check out, kills the whole tree while faults still wait on the held references (so no process
//! ever reads a page that was never served) and leaves the reason for the run loop, which
//! cold-starts the service ([`take_failure`]).

use super::error::RestoreError;
use super::Started;
use crate::config::RestoreMode;
use crate::criu::lazy::{self, LazyError, LazyPages};
use crate::criu::rpc::{Answer, Notification};
use crate::engine::Job;
use crate::store::Checkpoint;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long the daemon may take to receive the userfaultfds once CRIU reached `pre-resume`.
const HOLD_LIMIT: Duration = Duration::from_secs(10);

/// Why a lazy restore that had resumed the service was ended, for the run loop.
#[derive(Debug, Clone)]
pub struct Failure {
    pub checkpoint: String,
    pub reason: String,
    /// The checkpoint's bytes are proven wrong: it is quarantined.
    pub damaged: bool,
}

/// The failure of this supervisor's lazy restore, once the watch has ended the tree.
static FAILED: Mutex<Option<Failure>> = Mutex::new(None);

/// This supervisor's latest lazy transfer, while it runs and after.
static TRANSFER: Mutex<Option<Arc<Transfer>>> = Mutex::new(None);

/// One lazy restore's transfer: what a dump waits for (CRIU dumps only the pages a process has,
/// and a page not yet served is not there: a checkpoint taken meanwhile would miss it and
/// restore it as zeros) and what the status shows.
struct Transfer {
    checkpoint: String,
    progress: Arc<crate::criu::lazy::Progress>,
    resumed: Instant,
    phase: Mutex<Phase>,
    changed: Condvar,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Running,
    /// Every page in, this long after the daemon started.
    Complete(Duration),
    Failed(String),
}

/// Where a lazy transfer is, for `status`, the metrics and a dump that waits for it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransferStatus {
    pub checkpoint: String,
    pub state: TransferState,
    /// Pages served so far, of `pages_total` held lazily.
    pub pages_in: u64,
    pub pages_total: u64,
    pub pages_left: u64,
    /// Since the service resumed.
    pub mib_per_s: f64,
    /// From the start of the restore (the daemon's start) until every page was in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferState {
    Transferring,
    Complete,
    Failed,
}

impl Transfer {
    fn status(&self) -> TransferStatus {
        let phase = self.phase.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let total = self.progress.lazy_pages.load(Ordering::Relaxed);
        let sent = self.progress.pages_sent.load(Ordering::Relaxed);
        let pages_in = if phase == Phase::Running { sent.min(total) } else { sent };
        let secs = self.resumed.elapsed().as_secs_f64().max(1e-3);
        let (state, complete_ms) = match phase {
            Phase::Running => (TransferState::Transferring, None),
            Phase::Complete(took) => (TransferState::Complete, Some(took.as_millis() as u64)),
            Phase::Failed(_) => (TransferState::Failed, None),
        };
        let mib_per_s = match complete_ms {
            Some(ms) => pages_in as f64 * 4096.0 / (1 << 20) as f64 / (ms.max(1) as f64 / 1000.0),
            None => pages_in as f64 * 4096.0 / (1 << 20) as f64 / secs,
        };
        TransferStatus {
            checkpoint: self.checkpoint.clone(),
            state,
            pages_in,
            pages_total: total,
            pages_left: if state == TransferState::Complete { 0 } else { total.saturating_sub(pages_in) },
            mib_per_s: (mib_per_s * 10.0).round() / 10.0,
            complete_ms,
        }
    }

    fn end(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase;
        self.changed.notify_all();
    }
}

fn current_transfer() -> Option<Arc<Transfer>> {
    TRANSFER.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Before a new start: the transfer of the tree before it is over, whatever it came to.
pub fn forget() {
    *TRANSFER.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// The latest lazy transfer of this supervisor, if its service was restored lazily.
pub fn transfer() -> Option<TransferStatus> {
    current_transfer().map(|t| t.status())
}

/// Waits up to `limit` for the transfer to end, for whoever reports its progress; None when
/// there is no transfer.
pub fn transfer_after(limit: Duration) -> Option<TransferStatus> {
    let t = current_transfer()?;
    let phase = t.phase.lock().unwrap_or_else(|p| p.into_inner());
    let _ = t.changed.wait_timeout_while(phase, limit, |p| *p == Phase::Running);
    Some(t.status())
}

/// Why a dump could not wait for the lazy transfer to end.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unsettled {
    #[error(
        "failed to checkpoint while the lazy restore of checkpoint {checkpoint} still brings pages in: {pages_in} of {pages_total} were in when dump_timeout ({waited:?}) ran out (a checkpoint now would miss the others); try again when `stasis status` shows the transfer complete, or raise dump_timeout"
    )]
    Unfinished { checkpoint: String, pages_in: u64, pages_total: u64, waited: Duration },
    #[error("failed to checkpoint: the lazy restore of checkpoint {checkpoint} failed before every page was in, and the service is being cold-started ({reason})")]
    Failed { checkpoint: String, reason: String },
}

/// Before a dump: waits until every page of a lazy restore is in (by `deadline`), telling
/// `waiting` once when it has to. Ok at once when there is no transfer under way.
pub fn settle(deadline: Instant, waiting: impl FnOnce(&TransferStatus)) -> Result<(), Unsettled> {
    let Some(t) = current_transfer() else { return Ok(()) };
    let began = Instant::now();
    let mut phase = t.phase.lock().unwrap_or_else(|p| p.into_inner());
    if *phase == Phase::Running {
        drop(phase);
        waiting(&t.status());
        tracing::info!("dump: waiting for the lazy restore of checkpoint {} to bring every page in", t.checkpoint);
        phase = t.phase.lock().unwrap_or_else(|p| p.into_inner());
        let left = deadline.saturating_duration_since(Instant::now());
        phase =
            t.changed.wait_timeout_while(phase, left, |p| *p == Phase::Running).unwrap_or_else(|p| p.into_inner()).0;
    }
    match phase.clone() {
        Phase::Complete(_) => Ok(()),
        Phase::Failed(reason) => Err(Unsettled::Failed { checkpoint: t.checkpoint.clone(), reason }),
        Phase::Running => {
            drop(phase);
            let s = t.status();
            Err(Unsettled::Unfinished {
                checkpoint: s.checkpoint,
                pages_in: s.pages_in,
                pages_total: s.pages_total,
                waited: began.elapsed(),
            })
        }
    }
}

/// Whether `cp` is restored lazily: the service's `restore:`, else the host's default.
pub fn wanted(ctx: &Job, cp: &Checkpoint) -> bool {
    ctx.host.restore.mode_for(ctx.service.restore, cp.manifest.size_bytes) == RestoreMode::Lazy
}

/// The plain images and the daemon, before CRIU runs.
pub(super) fn set_up(
    ctx: &Job,
    cp: &Checkpoint,
    key: Option<&crate::store::seal::Key>,
) -> Result<LazyPages, RestoreError> {
    let limit = ctx.service.restore_timeout;
    let started = Instant::now();
    let prepared = lazy::prepare(cp, key).map_err(before_resume)?;
    let daemon = LazyPages::start(&ctx.criu.path, prepared, &cp.dir, limit, started + limit).map_err(before_resume)?;
    tracing::debug!("lazy restore: daemon {} ready after {:?}", daemon.pid(), started.elapsed());
    Ok(daemon)
}

/// The gate's part: at `pre-resume` (every process restored and stopped, the daemon handed
/// every userfaultfd), our own reference to each, or the tree must not resume.
pub fn at_notification(lazy: &mut Option<LazyPages>, n: &Notification) -> Answer {
    let Some(l) = lazy.as_mut() else { return Answer::Proceed };
    // CRIU names the root only at `post-restore` (cr-service.c), which comes first.
    if n.script == "post-restore" {
        l.root = n.pid.or(l.root);
    }
    let (Some(root), "pre-resume") = (l.root, n.script.as_str()) else {
        return Answer::Proceed;
    };
    match l.hold_uffds(root, HOLD_LIMIT) {
        Ok(_) => Answer::Proceed,
        Err(e) => {
            let why = e.to_string();
            l.failure = Some(e);
            Answer::Refuse(why)
        }
    }
}

/// A restore that failed while lazy: the daemon's own failure, if it had one, says why (and the
/// checkpoint is kept unless that proves it damaged), not CRIU's broken socket.
pub(super) fn failed_during(lazy: &mut LazyPages) -> Option<RestoreError> {
    lazy.failure.take().or_else(|| lazy.ended_early()).map(before_resume)
}

fn before_resume(e: LazyError) -> RestoreError {
    match e {
        LazyError::Damaged(problem) => RestoreError::Damaged(problem),
        LazyError::Write { .. } => RestoreError::Host(e.to_string()),
        other => RestoreError::Other(format!("lazy restore: {other}")),
    }
}

/// After the start: watches the transfer in a thread of its own (see the module doc).
pub fn watch(mut lazy: LazyPages, started: &Started) {
    let root = started.info.init_pid.as_raw();
    let checkpoint = started.info.checkpoint.clone().unwrap_or_default();
    *FAILED.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let transfer = Arc::new(Transfer {
        checkpoint: checkpoint.clone(),
        progress: lazy.progress.clone(),
        resumed: Instant::now(),
        phase: Mutex::new(Phase::Running),
        changed: Condvar::new(),
    });
    *TRANSFER.lock().unwrap_or_else(|p| p.into_inner()) = Some(transfer.clone());
    let spawned = std::thread::Builder::new().name("stasis-lazy-watch".into()).spawn(move || match lazy.wait() {
        Ok(took) => {
            let pages = lazy.progress.pages_sent.load(Ordering::Relaxed);
            tracing::info!("lazy restore of checkpoint {checkpoint}: every page in ({pages} served) after {took:?}");
            transfer.end(Phase::Complete(took));
        }
        Err(e) => {
            let damaged = e.damage().is_some();
            let reason = format!(
                "the lazy restore of checkpoint {checkpoint} failed after the service resumed: {e}; killed the restored processes before any could read a page that was not served"
            );
            tracing::warn!("{reason}");
            // Said before the tree dies: the run loop looks for it once it sees the exit.
            *FAILED.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Failure { checkpoint, reason: reason.clone(), damaged });
            transfer.end(Phase::Failed(reason));
            // The references are still held: faults wait while the tree dies.
            kill_tree(root);
            drop(lazy);
        }
    });
    if let Err(e) = spawned {
        // Unwatched, the references would never be let go and no dump would ever be taken:
        // end the tree now, as for a failed transfer.
        let reason = format!("failed to start watching the lazy restore: {e}");
        tracing::warn!("{reason}");
        *FAILED.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Failure { checkpoint: String::new(), reason: reason.clone(), damaged: false });
        if let Some(t) = current_transfer() {
            t.end(Phase::Failed(reason));
        }
        kill_tree(root);
    }
}

/// The failure the watch recorded, once (the run loop's cue to cold-start).
pub fn take_failure() -> Option<Failure> {
    FAILED.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// The namespace init is our child: killing it ends every process of its PID namespace. Waits
/// for it to be gone, so the held userfaultfds outlive every process that could fault.
fn kill_tree(root: i32) {
    crate::process::tree::kill_if_child_of(root, std::process::id() as i32, libc::SIGKILL);
    if !crate::process::tree::exits_within(root, Duration::from_secs(10)) {
        tracing::warn!("lazy restore: the restored tree of {root} did not die within 10 s of SIGKILL");
    }
}

/// After a failed lazy restore: the checkpoint quarantined if proven damaged (kept otherwise),
/// then a cold start that says why.
pub fn cold_after(ctx: &Job, f: &Failure) -> Result<Started, super::StartError> {
    let mut reason = f.reason.clone();
    if f.damaged {
        match ctx.store.quarantine(&f.checkpoint, &f.reason) {
            Ok(moved) => {
                let end = crate::criu::network_lock::LockEnd::NeverRestored;
                let _ = crate::criu::network_lock::end(&ctx.dirs.state_dir, &moved, end);
                reason.push_str(&format!("; quarantined it in {}", moved.display()));
            }
            Err(e) => reason.push_str(&format!("; failed to quarantine it: {e}")),
        }
    } else {
        reason.push_str("; the checkpoint is kept");
    }
    let mut s = super::start_service(ctx, super::Pick::Cold, &|_| {})?;
    s.info.fallback_reason = Some(reason);
    Ok(s)
}
