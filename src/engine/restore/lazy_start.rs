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
use std::sync::Mutex;
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
    let prepared = lazy::prepare(cp, key, started + limit).map_err(before_resume)?;
    let daemon = LazyPages::start(&ctx.criu.path, prepared, &cp.dir, limit).map_err(before_resume)?;
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
    let spawned = std::thread::Builder::new().name("stasis-lazy-watch".into()).spawn(move || match lazy.wait() {
        Ok(took) => {
            let pages = lazy.progress.pages_sent.load(std::sync::atomic::Ordering::Relaxed);
            tracing::info!("lazy restore of checkpoint {checkpoint}: every page in ({pages} served) after {took:?}");
        }
        Err(e) => {
            let damaged = e.damage().is_some();
            let reason = format!(
                "the lazy restore of checkpoint {checkpoint} failed after the service resumed: {e}; killed the restored processes before any could read a page that was not served"
            );
            tracing::warn!("{reason}");
            // Said before the tree dies: the run loop looks for it once it sees the exit.
            *FAILED.lock().unwrap_or_else(|p| p.into_inner()) = Some(Failure { checkpoint, reason, damaged });
            // The references are still held: faults wait while the tree dies.
            kill_tree(root);
            drop(lazy);
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("failed to start watching the lazy restore: {e}");
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
