//! Taking one checkpoint. A stopping dump is finalized at CRIU's post-dump notification while
//! the service is frozen (in this process: criu::post_dump), so the service is killed only once
//! the checkpoint is durable, and only if the stop is still asked for then (a kill-port client
//! admitted for its silence may have spoken or left since: kill_port::StopGate); a dump that
//! keeps the service running is finalized after CRIU returns. A failed dump is discarded and
//! its log kept as `last-failed-dump.log`; earlier checkpoints are never touched. A dump past
//! `dump_timeout` is killed and the service resumed. After a success, retention runs.

use super::context::Context;
use super::kill_port::StopGate;
use super::protocol::CheckpointReport;
use super::slots::{self, SlotKind};
use crate::criu::post_dump::{Frozen, Refusal};
use crate::criu::rpc::Answer;
use crate::criu::{network_lock, CriuError, DumpArgs, DUMP_LOG};
use crate::process::tree;
use crate::store::{DumpKind, Manifest, PendingCheckpoint};
use std::time::{Instant, SystemTime};

/// Less free space than this after a failed dump means the dump ran out of it.
const NEARLY_FULL: u64 = 1 << 20;

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
    ctx: &Context,
    init_pid: i32,
    kind: DumpKind,
    dry: bool,
    gate: Option<&StopGate>,
    progress: impl Fn(DumpProgress) + Sync,
) -> Result<CheckpointReport, String> {
    // The first line is the summary; CRIU's error lines, if any, follow it.
    let mut attempt = 0;
    let outcome = loop {
        attempt += 1;
        let mut retry = false;
        match dump(ctx, init_pid, kind, dry, gate, &progress, &mut retry) {
            Err(why) if retry && attempt < DUMP_ATTEMPTS => {
                tracing::info!("dump refused, retrying: {why}");
                std::thread::sleep(RETRY_PAUSE);
            }
            other => break other,
        }
    };
    let mut outcome = outcome.map_err(|e: String| {
        let (summary, details) = e.split_once('\n').map(|(s, d)| (s, format!("\n{d}"))).unwrap_or((&e, String::new()));
        format!("{summary}; the service keeps running and earlier checkpoints are untouched{details}")
    });
    if let Some(report) = outcome.as_mut().ok().filter(|r| !r.dry) {
        tracing::debug!("dump: retention");
        report.notes = super::retention::apply(ctx);
        tracing::debug!("dump: retention done");
    }
    outcome
}

/// Whether the disk holding the checkpoints has room for one more, estimated from the newest
/// checkpoint's size or, without one, from the tree's resident memory (what CRIU writes is
/// mostly that) and its /dev/shm data, with `min_free_bytes` to spare. The hook checks the shm
/// copies again as it makes them (store::shm::capture). Err says how much is needed and free.
pub fn room_for_periodic(ctx: &Context, init_pid: i32) -> Result<(), String> {
    let newest = ctx.store.list().ok().and_then(|l| l.iter().rev().find_map(|c| c.checkpoint()));
    let estimate = match newest {
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
        .map_err(|e| format!("failed to read the free space of {}: {e}", dir.display()))?;
    let needed = estimate.saturating_add(ctx.service.min_free_bytes);
    if free < needed {
        return Err(format!(
            "{} has {} free, and the checkpoint needs about {} plus min_free_bytes ({}); free space, lower min_free_bytes, or move --state-dir",
            dir.display(),
            crate::time_fmt::human_bytes(free),
            crate::time_fmt::human_bytes(estimate),
            crate::time_fmt::human_bytes(ctx.service.min_free_bytes)
        ));
    }
    Ok(())
}

/// How often a dump refused for a passing reason (see the action hook) is tried.
const DUMP_ATTEMPTS: u32 = 5;
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// On failure, `retry` says whether trying again soon may work.
fn dump(
    ctx: &Context,
    init_pid: i32,
    kind: DumpKind,
    dry: bool,
    gate: Option<&StopGate>,
    progress: &(impl Fn(DumpProgress) + Sync),
    retry: &mut bool,
) -> Result<CheckpointReport, String> {
    // Extending systemd's timeout covers the wait for a slot too.
    let _keep_systemd_waiting = super::systemd::extend_while_busy();
    let started = Instant::now();
    let name = &ctx.service.name;
    let mut waited = false;
    let _slot = slots::acquire(&ctx.dirs.slots(), SlotKind::Dump, ctx.host.max_concurrent_dumps, |ahead| {
        waited = true;
        progress(DumpProgress::Queued(format!(
            "Waiting: {ahead} checkpoint{} ahead of {name} (max_concurrent_dumps: {})",
            if ahead == 1 { "" } else { "s" },
            ctx.host.max_concurrent_dumps
        )))
    })
    .map_err(|e| format!("failed to take a dump slot in {}: {e}", ctx.dirs.slots().display()))?;
    if waited {
        progress(DumpProgress::Dumping);
    }
    tracing::debug!("dump: slot taken");
    // Read now, so a missing or unsafe key fails the dump before CRIU freezes anything.
    let key = match &ctx.service.encryption_key_file {
        Some(p) => Some(crate::store::seal::Key::load(p)?),
        None => None,
    };
    let generation = ctx.store.take_generation().map_err(|e| e.to_string())?;
    let pending = ctx.store.begin(generation).map_err(|e| e.to_string())?;
    // Hashing here, while the service still runs, fills the cache; the hook re-checks the
    // frozen tree's mappings against it at almost no cost.
    tracing::debug!("dump: pending checkpoint begun");
    // The slot is held from here: everything below, reading the service's files included, ends
    // by `dump_timeout` (CRIU gets what is left of it), so no service can keep the slot.
    let deadline = Instant::now() + ctx.service.dump_timeout;
    let mut cache = ctx.hash_cache();
    let executables = tree::executable_identities(init_pid, &mut cache, Some(deadline));
    cache.save();
    let executables = match executables {
        Ok(e) => e,
        Err(e) => {
            pending.discard();
            return Err(e.to_string());
        }
    };
    let draft = Manifest {
        format: crate::store::manifest_format(),
        id: pending.id.clone(),
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
        timings: None,
        compression: ctx.service.compression.map(|level| crate::store::Compression { algorithm: "zstd".into(), level }),
        encryption: key
            .as_ref()
            .map(|k| crate::store::Encryption { algorithm: "xchacha20poly1305".into(), key_id: k.id() }),
        shm_files: None,
        tmpfs_dirs: None,
        tmpfs_files: None,
        written_files: None,
        unknown: Default::default(),
    };
    tracing::debug!("dump: identities taken");
    if let Err(e) = pending.write_draft(&draft) {
        pending.discard();
        return Err(e.to_string());
    }
    let stopping = !kind.leaves_running();
    let args = DumpArgs {
        pid: init_pid,
        images_dir: pending.images_dir(),
        work_dir: pending.dir.clone(),
        config_file: ctx.service.criu_config.clone(),
        options: ctx.service.criu_options.clone(),
        leave_running: !stopping,
    };
    let frozen = Frozen {
        pending: &pending,
        tree_pid: init_pid,
        hash_cache: ctx.dirs.hash_cache(),
        min_free: ctx.service.min_free_bytes,
        deadline,
    };
    // What stasis does while CRIU holds the tree frozen, answered in this process (see
    // criu::post_dump); a refusal makes CRIU resume the tree.
    let mut refusal: Option<Refusal> = None;
    let mut at_post_dump = |received: &crate::criu::page_server::Received| {
        answer_post_dump(&frozen, received, stopping, key.as_ref(), gate, &mut refusal)
    };
    let dump_started = Instant::now();
    tracing::debug!("dump: running criu");
    let dumped = std::thread::scope(|s| {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (images, log) = (pending.images_dir(), pending.dir.join(DUMP_LOG));
        let report = |line: String| progress(DumpProgress::Progress(line));
        s.spawn(move || super::progress::watch_dump(images, log, &report, done_rx));
        let left = deadline.saturating_duration_since(Instant::now());
        let transform = crate::store::stored::Transform { compression: ctx.service.compression, key: key.as_ref() };
        let r = ctx.criu.dump(&args, &transform, left, &|_| {}, &mut at_post_dump);
        drop(done_tx);
        r
    });
    let dump_ms = dump_started.elapsed().as_millis() as u64;
    tracing::debug!("dump: criu done");

    if dry {
        // Everything a checkpoint would need was written; none of it is kept.
        let bytes = std::fs::read_dir(pending.images_dir())
            .map(|rd| rd.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0);
        return match dumped {
            Ok(_) => {
                pending.discard();
                Ok(CheckpointReport {
                    id: String::new(),
                    size_bytes: bytes,
                    duration: started.elapsed(),
                    dir: pending.dir.clone(),
                    notes: Vec::new(),
                    freeze: None,
                    dry: true,
                })
            }
            Err(e) => {
                resume(init_pid, &pending.dir, matches!(e, CriuError::TimedOut { .. }));
                *retry = refusal.as_ref().is_some_and(Refusal::passing);
                let text = describe_failed_dump(ctx, &pending, e, refusal.as_ref());
                pending.discard();
                Err(text)
            }
        };
    }
    let checkpoint = match dumped {
        Ok(_) if stopping => pending.finalized().ok_or_else(|| {
            "CRIU reported success but the checkpoint was not finalized at its post-dump notification".to_string()
        }),
        Ok(received) => record_dump_figures(&pending, dump_ms)
            .and_then(|_| pending.finalize_sealed(key.as_ref(), &received.images))
            .map_err(|e| e.to_string()),
        Err(e) => {
            let killed = matches!(e, CriuError::TimedOut { .. });
            match pending.finalized() {
                // The hook made it durable, CRIU failed after that, and the service is gone: the
                // checkpoint is exactly the service's last memory.
                Some(cp) if !tree::alive(init_pid) => Ok(cp),
                // ...but if the service was resumed it runs on, so that checkpoint is already stale.
                Some(cp) => {
                    resume(init_pid, &cp.dir, killed);
                    let marked =
                        ctx.store.record_run(&format!("resumed after the failed dump of checkpoint {}", cp.id));
                    let note = match marked {
                        Ok(_) => format!("checkpoint {} was saved but is stale", cp.id),
                        Err(m) => format!("checkpoint {} was saved, and marking it stale failed ({m})", cp.id),
                    };
                    return Err(format!(
                        "{} after the checkpoint was written; the service was resumed; {note}",
                        e.one_line()
                    ));
                }
                None => {
                    resume(init_pid, &pending.dir, killed);
                    match gate.and_then(StopGate::called_off) {
                        // Not a failed dump: CRIU's log is not kept as the last failed one.
                        Some(withdrawn) => Err(withdrawn.to_string()),
                        None => {
                            *retry = refusal.as_ref().is_some_and(Refusal::passing);
                            Err(describe_failed_dump(ctx, &pending, e, refusal.as_ref()))
                        }
                    }
                }
            }
        }
    };
    match checkpoint {
        Ok(mut cp) => {
            if !stopping {
                // CRIU unlocks the network itself when the service is left running.
                network_lock::mark_released(&cp.dir.join(DUMP_LOG));
            }
            let stats = crate::criu::stats::dump_stats(&cp.dir);
            let _ = cp.record_timings(|t| {
                t.dump_ms = Some(dump_ms);
                t.freeze_ms = stats.map(|s| s.frozen_us / 1000);
                t.pages = stats.map(|s| s.pages_written);
            });
            Ok(CheckpointReport {
                id: cp.id,
                size_bytes: cp.manifest.size_bytes,
                duration: started.elapsed(),
                dir: cp.dir,
                notes: Vec::new(),
                freeze: stats.map(|s| std::time::Duration::from_micros(s.frozen_us)),
                dry: false,
            })
        }
        Err(e) => {
            pending.discard();
            Err(e)
        }
    }
}

/// What the dump's `post-dump` answers while CRIU holds the tree frozen. A dump that keeps the
/// service running: the checks and records. A stopping one: the same, then the stop asked
/// again of whoever asked for it (`gate`: the last moment before CRIU ends the service), then
/// the checkpoint made durable. `refusal` keeps the cause of a refusal of criu::post_dump's.
fn answer_post_dump(
    frozen: &Frozen,
    received: &crate::criu::page_server::Received,
    stopping: bool,
    key: Option<&crate::store::seal::Key>,
    gate: Option<&StopGate>,
    refusal: &mut Option<Refusal>,
) -> Answer {
    let done = if stopping {
        frozen.check_and_record_frozen().map(|()| gate.map_or(Ok(()), StopGate::check))
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
fn resume(init_pid: i32, dump_dir: &std::path::Path, killed: bool) {
    if killed && tree::alive(init_pid) {
        for pid in tree::descendants(init_pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGCONT);
        }
    }
    network_lock::release(&dump_dir.join(DUMP_LOG));
}

fn describe_failed_dump(ctx: &Context, pending: &PendingCheckpoint, e: CriuError, refusal: Option<&Refusal>) -> String {
    // Keep CRIU's log: the pending directory is about to be removed.
    let kept = ctx.paths.failed_dump_log();
    let keep_log = |log: &std::path::Path| {
        // The checkpoints may be another filesystem (a full one, even): copy when rename can't.
        let moved = std::fs::rename(log, &kept).is_ok() || std::fs::copy(log, &kept).is_ok();
        if moved {
            kept.clone()
        } else {
            log.to_path_buf()
        }
    };
    let e = match e {
        CriuError::Failed { action, status, log, errors } => {
            let kept_log = keep_log(&log);
            // A full disk can leave the log file short: keep at least the lines quoted here.
            if std::fs::metadata(&kept_log).map(|m| m.len() == 0).unwrap_or(true) && !errors.is_empty() {
                let _ = std::fs::write(&kept_log, format!("{}\n", errors.join("\n")));
            }
            CriuError::Failed { action, status, log: kept_log, errors }
        }
        // CRIU got what was left of dump_timeout; the setting is what the user knows.
        CriuError::TimedOut { action, setting, log, .. } => {
            CriuError::TimedOut { action, setting, after: ctx.service.dump_timeout, log: keep_log(&log) }
        }
        other => other,
    };
    let mut text = e.one_line();
    // A cause CRIU's log shows often, said in the service's terms with the fix, first.
    if let CriuError::Failed { errors, .. } = &e {
        if let Some(why) = crate::criu::diagnose::diagnose(errors, &ctx.service.name) {
            text = format!("{why} ({text})");
        }
    }
    if let Some(r @ Refusal::ProcFileOpen { .. }) = refusal {
        text = format!("{r}; {text}");
    }
    let dir = pending.dir.parent().unwrap_or(&pending.dir);
    if let CriuError::Failed { errors, .. } = &e {
        let says_full =
            errors.iter().any(|l| l.contains("No space left") || l.contains("(-28)") || l.contains("Disk quota"));
        // A full disk may not even leave room for CRIU's log, so ask the filesystem as well.
        let is_full = nix::sys::statvfs::statvfs(dir)
            .map(|v| v.blocks_available().saturating_mul(v.fragment_size()) < NEARLY_FULL)
            .unwrap_or(false);
        if says_full || is_full {
            text.push_str(&format!(
                "; the disk holding {} is full (No space left on device): free space or move --state-dir to a larger filesystem",
                dir.display()
            ));
        }
        for line in errors {
            text.push('\n');
            text.push_str(line);
        }
    }
    text
}
