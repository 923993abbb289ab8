//! Taking one checkpoint. A stopping dump is finalized at CRIU's post-dump notification while
//! the service is frozen (in this process: post_dump.rs), so the service is killed only once
//! the checkpoint is durable, and only if the stop is still asked for then (whoever asked may
//! have changed its mind since: [`StopGate`]); a dump that keeps the service running is
//! finalized after CRIU returns. A failed dump is discarded and its log kept as
//! `last-failed-dump.log`; earlier checkpoints are never touched. A dump past `dump_timeout`
//! is killed and the service resumed. After a success, retention runs. The outcome is a
//! [`CheckpointReport`] or a [`DumpError`] (error.rs).

mod error;
pub mod incremental;
pub mod post_dump;
mod pre_copy;

pub use error::{DumpError, FailedDump, NoRoom, Withdrawn, WithdrawnBy};

use super::slots::{self, SlotKind};
use crate::criu::page_server::{Pages, Received};
use crate::criu::rpc::Answer;
use crate::criu::{network_lock, CriuError, DumpArgs, DUMP_LOG};
use crate::engine::Job;
use crate::process::tree;
use crate::store::seal::Key;
use crate::store::{Checkpoint, DumpKind, Manifest, PendingCheckpoint};
use incremental::Base;
use post_dump::{Frozen, Refusal};
use pre_copy::PreCopied;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// What a checkpoint that was taken (or a dry run) came to.
#[derive(Debug, Clone)]
pub struct CheckpointReport {
    pub id: String,
    pub size_bytes: u64,
    pub duration: Duration,
    pub dir: PathBuf,
    /// What retention removed after it (for the log).
    pub notes: Vec<String>,
    /// How long CRIU kept the service frozen, when its stats say.
    pub freeze: Option<Duration>,
    /// A dry run (`stasis doctor`): dumped, then thrown away.
    pub dry: bool,
}

/// Who asked for a stopping dump, asked again at its `post-dump` ([`Self::check`]), the last
/// moment before CRIU ends the service: the supervisor's kill-port clients.
pub trait StopGate: Sync {
    /// Err when nobody asks for the stop any more.
    fn check(&self) -> Result<(), Withdrawn>;
    /// Whether [`Self::check`] called the stop off.
    fn called_off(&self) -> Option<Withdrawn>;
}

/// Where a dump is, for whoever waits on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DumpProgress {
    /// Waiting for a host dump slot; the line is for the people who asked.
    Queued(String),
    /// Got the slot after waiting: dumping now.
    Dumping,
    /// A line about a dump under way for more than a second (bytes written, rate).
    Progress(String),
}

/// `progress` hears when the dump has to queue for a host slot, and when it got one. A stop
/// stands only if `gate` (who asked for it) still says so at `post-dump`.
pub fn take_checkpoint(
    ctx: &Job,
    init_pid: i32,
    kind: DumpKind,
    dry: bool,
    gate: Option<&dyn StopGate>,
    progress: impl Fn(DumpProgress) + Sync,
) -> Result<CheckpointReport, DumpError> {
    let mut attempt = 0;
    let mut outcome = loop {
        attempt += 1;
        match dump(ctx, init_pid, kind, dry, gate, &progress) {
            Err(why) if why.may_pass() && attempt < DUMP_ATTEMPTS => {
                tracing::info!("dump refused, retrying: {}", why.summary());
                std::thread::sleep(RETRY_PAUSE);
            }
            other => break other,
        }
    };
    if let Some(report) = outcome.as_mut().ok().filter(|r| !r.dry) {
        tracing::debug!("dump: retention");
        report.notes.extend(super::retention::apply(ctx));
        tracing::debug!("dump: retention done");
    }
    outcome
}

/// Whether the disk holding the checkpoints has room for one more, estimated from the biggest
/// kept checkpoint's size or, without one, from the tree's resident memory (what CRIU writes is
/// mostly that) and its /dev/shm data, with `min_free_bytes` to spare. The hook checks the shm
/// copies again as it makes them (store::shm::capture). Err says how much is needed and free.
pub fn room_for_periodic(ctx: &Job, init_pid: i32) -> Result<(), NoRoom> {
    // The biggest kept one: the newest may be incremental, and the next one full.
    let biggest = ctx
        .store
        .list()
        .ok()
        .and_then(|l| l.iter().filter_map(|c| c.checkpoint()).max_by_key(|c| c.manifest.size_bytes));
    let estimate = match biggest {
        Some(cp) => cp.manifest.size_bytes,
        // The /dev/shm copies come on top (a segment only held open is in no resident set).
        None => {
            tree::descendants(init_pid).into_iter().map(tree::resident_bytes).sum::<u64>()
                + crate::store::shm::data_bytes_of(&tree::shm_handles(init_pid))
        }
    };
    // The checkpoints directory appears with the first checkpoint; until then, its parent.
    let dir = if ctx.store.dir().exists() { ctx.store.dir() } else { ctx.paths.root.as_path() };
    let free = nix::sys::statvfs::statvfs(dir)
        .map(|v| v.blocks_available().saturating_mul(v.fragment_size()))
        .map_err(|source| NoRoom::FreeSpace { dir: dir.to_path_buf(), source })?;
    let min_free = ctx.service.min_free_bytes;
    if free < estimate.saturating_add(min_free) {
        return Err(NoRoom::Full { dir: dir.to_path_buf(), free, estimate, min_free });
    }
    Ok(())
}

/// How often a dump refused for a passing reason (see the action hook) is tried.
const DUMP_ATTEMPTS: u32 = 5;
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What the steps of one dump share once its pending checkpoint is begun.
struct Run<'a> {
    ctx: &'a Job,
    init_pid: i32,
    /// A stopping dump: the service ends with it.
    stopping: bool,
    key: Option<&'a Key>,
    pending: &'a PendingCheckpoint,
    /// Everything from the draft on, reading the service's files included, ends by `dump_timeout`.
    deadline: Instant,
    /// What the dump is taken against (incremental.rs).
    base: &'a Base,
    /// A stop's pre-dump, in the pending checkpoint (pre_copy.rs).
    pre: Option<&'a PreCopied>,
}

/// What CRIU came to, and what `post-dump` refused (if it did).
struct Dumped {
    result: Result<Received, CriuError>,
    refusal: Option<Refusal>,
    dump_ms: u64,
}

fn dump(
    ctx: &Job,
    init_pid: i32,
    kind: DumpKind,
    dry: bool,
    gate: Option<&dyn StopGate>,
    progress: &(impl Fn(DumpProgress) + Sync),
) -> Result<CheckpointReport, DumpError> {
    let started = Instant::now();
    // Pages of a lazy restore not yet in are not in the process either: CRIU would not dump them.
    let waited = std::cell::Cell::new(false);
    let settled = crate::engine::restore::lazy_start::settle(started + ctx.service.dump_timeout, |t| {
        waited.set(true);
        progress(DumpProgress::Queued(format!(
            "Waiting: the lazy restore of checkpoint {} is bringing pages in ({} of {}); the checkpoint follows once every page is in",
            t.checkpoint, t.pages_in, t.pages_total
        )))
    });
    settled.map_err(|e| DumpError::LazyTransfer(Box::new(e)))?;
    if waited.get() {
        progress(DumpProgress::Dumping);
    }
    let _slot = take_slot(ctx, progress)?;
    tracing::debug!("dump: slot taken");
    // Read now, so a missing or unsafe key fails the dump before CRIU freezes anything.
    let key = match &ctx.service.encryption_key_file {
        Some(path) => Some(Key::load(path).map_err(DumpError::Key)?),
        None => None,
    };
    let generation = ctx.store.take_generation()?;
    let pending = ctx.store.begin(generation)?;
    tracing::debug!("dump: pending checkpoint begun");
    let base = incremental::plan(ctx, init_pid, kind, dry);
    // A stop's pre-dump has a `dump_timeout` of its own: the service runs meanwhile.
    let pre = (kind == DumpKind::Stop && !dry && pre_copy::wanted(ctx))
        .then(|| pre_copy::run(ctx, init_pid, &pending, key.as_ref(), progress))
        .flatten();
    // The slot is held from here: everything below ends by `dump_timeout` (CRIU gets what is
    // left of it), so no service can keep the slot.
    let deadline = Instant::now() + ctx.service.dump_timeout;
    let stopping = !kind.leaves_running();
    let run =
        Run { ctx, init_pid, stopping, key: key.as_ref(), pending: &pending, deadline, base: &base, pre: pre.as_ref() };
    let outcome = write_draft(&run, kind, generation).and_then(|()| {
        let dumped = run_criu(&run, gate, progress);
        let dump_ms = dumped.dump_ms;
        if dry {
            dry_report(&run, dumped, started)
        } else {
            settle(&run, dumped, gate).map(|cp| {
                if run.base.track_mem() && !stopping {
                    incremental::remember(ctx, init_pid, &cp.id, run.base.depth());
                }
                let mut r = report(&ctx.dirs.state_dir, cp, stopping, started, dump_ms);
                r.notes.extend(chain_note(run.base, run.pre));
                r
            })
        }
    });
    match &outcome {
        // It is a checkpoint now (stale), not a pending one.
        Err(DumpError::AfterWrite { .. }) => {}
        // A dry run keeps nothing.
        Err(_) | Ok(CheckpointReport { dry: true, .. }) => pending.discard(),
        Ok(_) => {}
    }
    outcome
}

fn take_slot(ctx: &Job, progress: &(impl Fn(DumpProgress) + Sync)) -> Result<slots::Slot, DumpError> {
    let mut waited = false;
    let slot = slots::acquire(&ctx.dirs.slots(), SlotKind::Dump, ctx.host.max_concurrent_dumps, |ahead| {
        waited = true;
        progress(DumpProgress::Queued(format!(
            "Waiting: {ahead} checkpoint{} ahead of {} (max_concurrent_dumps: {})",
            if ahead == 1 { "" } else { "s" },
            ctx.service.name,
            ctx.host.max_concurrent_dumps
        )))
    })
    .map_err(|source| DumpError::Slot { dir: ctx.dirs.slots(), source })?;
    if waited {
        progress(DumpProgress::Dumping);
    }
    Ok(slot)
}

/// The manifest as far as it is known before CRIU runs, with the identity of every executable
/// the tree maps.
fn write_draft(run: &Run, kind: DumpKind, generation: u64) -> Result<(), DumpError> {
    let (ctx, init_pid) = (run.ctx, run.init_pid);
    // Hashing here, while the service still runs, fills the cache; the hook re-checks the
    // frozen tree's mappings against it at almost no cost.
    let mut cache = ctx.hash_cache();
    let executables = tree::executable_identities(init_pid, &mut cache, Some(run.deadline));
    cache.save();
    let executables = executables.map_err(DumpError::Identities)?;
    let draft = Manifest {
        format: crate::store::manifest_format(),
        id: run.pending.id.clone(),
        generation: Some(generation),
        service: ctx.service.name.clone(),
        kind,
        created_at: crate::time_fmt::rfc3339_utc(SystemTime::now()),
        stasis_version: env!("CARGO_PKG_VERSION").to_string(),
        criu_version: ctx.criu.version.clone(),
        kernel_version: Some(ctx.kernel_version.clone()),
        config_digest: Some(ctx.service.digest()),
        init_binary: std::fs::read_link(format!("/proc/{init_pid}/exe")).unwrap_or_else(|_| ctx.init_binary.clone()),
        stdout_pipe_inode: tree::stdout_pipe_inode(init_pid),
        size_bytes: 0,
        hash_algorithm: None,
        images: None,
        executables: Some(executables),
        timings: run.pre.map(|p| crate::store::Timings {
            pre_copy_ms: Some(p.took_ms),
            pre_copy_pages: Some(p.received.pages),
            ..Default::default()
        }),
        compression: ctx.service.compression.map(|level| crate::store::Compression { algorithm: "zstd".into(), level }),
        encryption: run.key.map(|k| crate::store::Encryption { algorithm: "xchacha20poly1305".into(), key_id: k.id() }),
        shm_files: None,
        tmpfs_dirs: None,
        tmpfs_files: None,
        written_files: None,
        parent: run.base.parent_ref(),
        pre_copy: run.pre.map(|_| pre_copy::rel_dir()),
        unknown: Default::default(),
    };
    tracing::debug!("dump: identities taken");
    Ok(run.pending.write_draft(&draft)?)
}

/// Runs CRIU's dump, answering its `post-dump` in this process, with a line about it now and
/// then for whoever waits.
fn run_criu(run: &Run, gate: Option<&dyn StopGate>, progress: &(impl Fn(DumpProgress) + Sync)) -> Dumped {
    let (ctx, pending) = (run.ctx, run.pending);
    // The parent's images as CRIU finds them from this dump's images directory, and the
    // pagemaps it has (the only ones this dump's pages may be left in).
    let (parent_img, parent) = match (run.base, run.pre) {
        (_, Some(pre)) => (Some(crate::store::chain::PRE_DUMP_DIR.to_string()), pre.pagemaps.clone()),
        (Base::Parent { parent, .. }, None) => (
            Some(format!("../../{}/{}", parent.id, crate::store::IMAGES_DIR)),
            parent
                .manifest
                .images
                .iter()
                .flatten()
                .filter_map(|f| f.path.strip_prefix(&format!("{}/", crate::store::IMAGES_DIR)))
                .filter(|n| n.starts_with("pagemap-") && !n.contains('/'))
                .map(str::to_string)
                .collect(),
        ),
        _ => (None, Default::default()),
    };
    let track_mem = run.base.track_mem() || run.pre.is_some();
    let args = DumpArgs {
        pid: run.init_pid,
        images_dir: pending.images_dir(),
        work_dir: pending.dir.clone(),
        config_file: ctx.service.criu_config.clone(),
        options: ctx.service.criu_options.clone(),
        leave_running: !run.stopping,
        track_mem,
        parent_img,
        pages: Pages { rel_dir: crate::store::IMAGES_DIR.to_string(), parent },
    };
    if track_mem {
        // Whatever this dump comes to, the soft-dirty bits are its own from here.
        incremental::forget(ctx);
    }
    let frozen = Frozen {
        pending,
        tree_pid: run.init_pid,
        hash_cache: ctx.dirs.hash_cache(),
        min_free: ctx.service.min_free_bytes,
        deadline: run.deadline,
    };
    // What stasis does while CRIU holds the tree frozen, answered in this process (see
    // post_dump.rs); a refusal makes CRIU resume the tree.
    let mut refusal: Option<Refusal> = None;
    let mut at_post_dump = |received: &Received| match run.pre {
        // The pre-dump's images are the checkpoint's too: hashed as they arrived, not read again.
        Some(pre) => {
            let images = [pre.received.images.clone(), received.images.clone()].concat();
            let all = Received { images, ..Default::default() };
            answer_post_dump(&frozen, &all, run.stopping, run.key, gate, &mut refusal)
        }
        None => answer_post_dump(&frozen, received, run.stopping, run.key, gate, &mut refusal),
    };
    let dump_started = Instant::now();
    tracing::debug!("dump: running criu");
    let result = std::thread::scope(|s| {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (images, log) = (pending.images_dir(), pending.dir.join(DUMP_LOG));
        let report = |line: String| progress(DumpProgress::Progress(line));
        s.spawn(move || super::progress::watch_dump(images, log, false, &report, done_rx));
        let left = run.deadline.saturating_duration_since(Instant::now());
        let transform = crate::store::stored::Transform { compression: ctx.service.compression, key: run.key };
        let r = ctx.criu.dump(&args, &transform, left, &|_| {}, &mut at_post_dump);
        drop(done_tx);
        r
    });
    let dump_ms = dump_started.elapsed().as_millis() as u64;
    tracing::debug!("dump: criu done");
    Dumped { result, refusal, dump_ms }
}

/// A dry run: everything a checkpoint would need was written; none of it is kept.
fn dry_report(run: &Run, dumped: Dumped, started: Instant) -> Result<CheckpointReport, DumpError> {
    let bytes = std::fs::read_dir(run.pending.images_dir())
        .map(|rd| rd.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    match dumped.result {
        Ok(_) => Ok(CheckpointReport {
            id: String::new(),
            size_bytes: bytes,
            duration: started.elapsed(),
            dir: run.pending.dir.clone(),
            notes: Vec::new(),
            freeze: None,
            dry: true,
        }),
        Err(e) => {
            resume(&run.ctx.dirs.state_dir, run.init_pid, &run.pending.dir, matches!(e, CriuError::TimedOut { .. }));
            Err(DumpError::Criu(Box::new(FailedDump::new(run.ctx, run.pending, e, dumped.refusal))))
        }
    }
}

/// The checkpoint CRIU's dump came to: finalized at `post-dump` (a stopping dump) or now.
fn settle(run: &Run, dumped: Dumped, gate: Option<&dyn StopGate>) -> Result<Checkpoint, DumpError> {
    let (ctx, init_pid, pending) = (run.ctx, run.init_pid, run.pending);
    let e = match dumped.result {
        Ok(_) if run.stopping => return pending.finalized().ok_or(DumpError::NotFinalized),
        Ok(received) => {
            record_dump_figures(pending, dumped.dump_ms)?;
            return Ok(pending.finalize_sealed(run.key, &received.images)?);
        }
        Err(e) => e,
    };
    let killed = matches!(e, CriuError::TimedOut { .. });
    match pending.finalized() {
        // The hook made it durable, CRIU failed after that, and the service is gone: the
        // checkpoint is exactly the service's last memory.
        Some(cp) if !tree::alive(init_pid) => Ok(cp),
        // ...but if the service was resumed it runs on, so that checkpoint is already stale.
        Some(cp) => {
            resume(&ctx.dirs.state_dir, init_pid, &cp.dir, killed);
            let marking = ctx.store.record_run(&format!("resumed after the failed dump of checkpoint {}", cp.id)).err();
            Err(DumpError::AfterWrite { criu: e, id: cp.id, marking })
        }
        None => {
            resume(&ctx.dirs.state_dir, init_pid, &pending.dir, killed);
            match gate.and_then(|g| g.called_off()) {
                // Not a failed dump: CRIU's log is not kept as the last failed one.
                Some(withdrawn) => Err(DumpError::Withdrawn(withdrawn)),
                None => Err(DumpError::Criu(Box::new(FailedDump::new(ctx, pending, e, dumped.refusal)))),
            }
        }
    }
}

/// What the service log says of an incremental checkpoint or a pre-copy stop.
fn chain_note(base: &Base, pre: Option<&PreCopied>) -> Option<String> {
    match (base, pre) {
        (_, Some(p)) => Some(format!(
            "pre-copy: {} pages copied in {} ms while the service ran; the freeze dumped only what changed since",
            p.received.pages, p.took_ms
        )),
        (Base::Parent { parent, depth }, None) => {
            Some(format!("incremental: only the pages written since checkpoint {} ({depth} in its chain)", parent.id))
        }
        _ => None,
    }
}

/// What a dump that made checkpoint `cp` reports, once its figures are recorded.
fn report(state_dir: &Path, mut cp: Checkpoint, stopping: bool, started: Instant, dump_ms: u64) -> CheckpointReport {
    if !stopping {
        // CRIU unlocks the network itself when the service is left running.
        let _ = network_lock::end(state_dir, &cp.dir, network_lock::LockEnd::RemovedByCriu);
    }
    let stats = crate::criu::stats::dump_stats(&cp.dir);
    let _ = cp.record_timings(|t| {
        t.dump_ms = Some(dump_ms);
        t.freeze_ms = stats.map(|s| s.frozen_us / 1000);
        t.pages = stats.map(|s| s.pages_written);
    });
    CheckpointReport {
        id: cp.id,
        size_bytes: cp.manifest.size_bytes,
        duration: started.elapsed(),
        dir: cp.dir,
        notes: Vec::new(),
        freeze: stats.map(|s| Duration::from_micros(s.frozen_us)),
        dry: false,
    }
}

/// What the dump's `post-dump` answers while CRIU holds the tree frozen. A dump that keeps the
/// service running: the checks and records. A stopping one: the same, then the stop asked
/// again of whoever asked for it (`gate`: the last moment before CRIU ends the service), then
/// the checkpoint made durable. `refusal` keeps the cause of a refusal of post_dump.rs's.
fn answer_post_dump(
    frozen: &Frozen,
    received: &Received,
    stopping: bool,
    key: Option<&Key>,
    gate: Option<&dyn StopGate>,
    refusal: &mut Option<Refusal>,
) -> Answer {
    let done = if stopping {
        frozen.check_and_record_frozen().map(|()| gate.map_or(Ok(()), |g| g.check()))
    } else {
        frozen.check_and_record().map(Ok)
    };
    let done = match done {
        Ok(Err(withdrawn)) => return Answer::Refuse(withdrawn.to_string()),
        Ok(Ok(())) if stopping => frozen.finalize(key, received).map(drop),
        Ok(Ok(())) => Ok(()),
        Err(r) => Err(r),
    };
    match done {
        Ok(()) => Answer::Proceed,
        Err(r) => {
            let why = r.to_string();
            *refusal = Some(r);
            Answer::Refuse(why)
        }
    }
}

/// A dump that left the service running: its figures go into the draft, so the checkpoint's
/// manifest has them the moment it appears (a listing never sees one without them).
fn record_dump_figures(pending: &PendingCheckpoint, dump_ms: u64) -> Result<(), crate::store::StoreError> {
    let stats = crate::criu::stats::dump_stats(&pending.dir);
    let mut draft = pending.read_draft()?;
    let t = draft.timings.get_or_insert_with(Default::default);
    t.dump_ms = Some(dump_ms);
    t.freeze_ms = stats.map(|s| s.frozen_us / 1000);
    t.pages = stats.map(|s| s.pages_written);
    pending.write_draft(&draft)
}

/// After a dump that failed: the connections CRIU held with its network lock are let go (a
/// killed CRIU cannot), and after a killed one every process of the tree runs again (the dead
/// tracer leaves them detached; SIGCONT ends any stop it left).
fn resume(state_dir: &Path, init_pid: i32, dump_dir: &Path, killed: bool) {
    if killed && tree::alive(init_pid) {
        for pid in tree::descendants(init_pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGCONT);
        }
    }
    let _ = network_lock::end(state_dir, dump_dir, network_lock::LockEnd::NeverRestored);
}
