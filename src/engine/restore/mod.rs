//! Restore-or-cold start, and the proof a restore needs. Candidates are tried newest first; each
//! must be fresh (or allowed stale), have every image intact, and fit the program on disk. The
//! images' listing and sizes are checked before CRIU runs; their content is checked as CRIU
//! reads it (criu::streamer), and the restored tree resumes only once every byte it was given
//! checked out (with a CRIU that cannot stream images, in a pass before CRIU runs). Damaged
//! images and checkpoint-related CRIU failures quarantine the checkpoint and the next allowed
//! one is tried; a checkpoint that does not fit is kept and marked; a CRIU failure caused by
//! the host keeps the checkpoint and fails the start. The run is recorded (making every
//! checkpoint stale) durably before the service runs. The outcome is a [`Started`] service or a
//! [`StartError`] (error.rs); the cold start is cold.rs.

mod cold;
mod error;
pub mod lazy_start;

pub use error::StartError;

use super::slots::{self, SlotKind};
use crate::config::OnIncompatible;
use crate::criu::rpc::{Answer, Notification};
use crate::criu::streamer::{OwnFilesError, Streamer};
use crate::criu::{RestoreArgs, RestoreFailure};
use crate::engine::Job;
use crate::store::compress::PlainImages;
use crate::store::{identity, verify, Checkpoint, Freshness};
use error::RestoreError;
use nix::unistd::Pid;
use std::os::fd::{AsFd, OwnedFd};

pub struct Started {
    pub info: StartInfo,
    /// Read end of the service's stdout/stderr pipe.
    pub output: OwnedFd,
    /// Where a cold-launched `ready: notify` service says it is ready.
    pub notify: Option<crate::process::NotifySocket>,
}

/// How a run of the service began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartedFrom {
    Checkpoint,
    Cold,
}

pub struct StartInfo {
    pub init_pid: Pid,
    pub started_from: StartedFrom,
    pub checkpoint: Option<String>,
    /// Why the newest checkpoint was not the one restored (or why none was).
    pub fallback_reason: Option<String>,
    /// Things worth a warning that did not change what was started.
    pub notes: Vec<String>,
    /// How long `criu restore` took, when restored.
    pub restore_ms: Option<u64>,
    /// When the start began (the first answer is timed from it).
    pub began: std::time::Instant,
}

/// What trying one checkpoint came to, when it did not start the service.
enum Refusal {
    /// Skip it and try the next candidate (or cold-start); the text is for `fallback_reason`.
    Skip(String),
    /// Do not cold-start: the start fails with this error; the checkpoint is kept.
    Stop(StartError),
}

/// Where a start is, for whoever waits on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartProgress {
    /// A `Progress: ` line for the person waiting on `start` (and systemd's STATUS=).
    Line(String),
    /// Waiting for a host restore slot; the line says how many are ahead.
    Queued(String),
}

/// Hears how the start goes.
pub type Progress<'a> = &'a (dyn Fn(StartProgress) + Sync);

/// A phase beginning, for whoever waits.
fn phase(progress: Progress, name: &str, bytes: u64) {
    progress(StartProgress::Line(crate::engine::progress::phase(name, bytes)));
}

/// Which checkpoints a start may restore.
#[derive(Debug, Clone, Copy)]
pub enum Pick<'a> {
    /// The newest good one that is fresh (or allowed stale by `restore_stale`), else cold.
    Newest,
    /// `start --from ID`: that one or nothing.
    Id(&'a str),
    /// A restart after the service exited (`restart_from: checkpoint`): the newest good one
    /// below `below_generation`, stale or not (minutes-old memory beats none), else cold.
    AfterExit { below_generation: Option<u64> },
    /// A restart with `restart_from: cold`, or after every checkpoint crashed.
    Cold,
}

/// Starts the service as `pick` says: a restore of the first checkpoint that proves right, or a
/// cold launch.
pub fn start_service(ctx: &Job, pick: Pick, progress: Progress) -> Result<Started, StartError> {
    let began = std::time::Instant::now();
    // A new tree: whatever the last one's lazy transfer came to is no longer what a dump waits for.
    lazy_start::forget();
    let mut started = pick_and_start(ctx, pick, progress)?;
    started.info.began = began;
    Ok(started)
}

fn pick_and_start(ctx: &Job, pick: Pick, progress: Progress) -> Result<Started, StartError> {
    for dir in ctx.store.check_private()? {
        tracing::warn!("{} could be read by other users; made it 0700", dir.display());
    }
    // A dump cut short (its supervisor died) may still hold CRIU's network lock.
    for dir in ctx.store.incomplete() {
        let _ = crate::criu::network_lock::end(
            &ctx.dirs.state_dir,
            &dir,
            crate::criu::network_lock::LockEnd::NeverRestored,
        );
    }
    ctx.store.remove_incomplete();
    let below = match pick {
        Pick::Id(id) => return start_from(ctx, id, progress),
        Pick::Cold => return cold::start(ctx, None),
        Pick::Newest => None,
        Pick::AfterExit { below_generation } => Some(below_generation),
    };
    let generations = ctx.store.generations();
    let mut reasons: Vec<String> = Vec::new();
    for listed in ctx.store.list()?.into_iter().rev() {
        if !listed.dir.exists() {
            // Quarantined meanwhile, as the damaged parent of a newer one (said for that one).
            continue;
        }
        let Some(cp) = listed.checkpoint() else {
            reasons.push(format!(
                "checkpoint {} is damaged ({}); skipped it",
                listed.id,
                listed.manifest.as_ref().err().cloned().unwrap_or_default()
            ));
            continue;
        };
        if let Some(Some(limit)) = below {
            if cp.manifest.generation.unwrap_or(0) >= limit {
                reasons
                    .push(format!("checkpoint {} was restored before and the service exited again; skipped it", cp.id));
                continue;
            }
        }
        if let Freshness::Stale(why) = generations.freshness(cp.manifest.generation, cp.manifest.kind) {
            if !ctx.service.restore_stale && below.is_none() {
                reasons.push(format!(
                    "checkpoint {} is stale: {why}; restoring it would bring back older memory (set `restore_stale: true` to allow that, or run `stasis start {} --from {}`)",
                    cp.id, ctx.service.name, cp.id
                ));
                // Every older checkpoint is staler still.
                break;
            }
        }
        match try_restore(ctx, &cp, false, progress) {
            Ok(mut started) => {
                started.info.fallback_reason = (!reasons.is_empty()).then(|| reasons.join("; then "));
                return Ok(started);
            }
            Err(Refusal::Skip(why)) => reasons.push(why),
            Err(Refusal::Stop(e)) => return Err(e),
        }
    }
    let fallback = (!reasons.is_empty()).then(|| reasons.join("; then "));
    // A cold start that fails after a checkpoint was passed over says both.
    cold::start(ctx, fallback.clone()).map_err(|e| match fallback {
        Some(because) => StartError::ColdAfterFallback { error: Box::new(e), because },
        None => e,
    })
}

/// `start --from ID`: that checkpoint, stale or not, or nothing at all.
fn start_from(ctx: &Job, id: &str, progress: Progress) -> Result<Started, StartError> {
    let listed = ctx.store.get(id)?.ok_or_else(|| StartError::NotFound {
        id: id.to_string(),
        service: ctx.service.name.clone(),
        dir: ctx.store.dir().to_path_buf(),
    })?;
    let cp = listed.checkpoint().ok_or_else(|| StartError::Unreadable {
        id: id.to_string(),
        why: listed.manifest.as_ref().err().cloned().unwrap_or_default(),
    })?;
    match try_restore(ctx, &cp, true, progress) {
        Ok(started) => Ok(started),
        Err(Refusal::Skip(reason)) => Err(StartError::Requested { reason }),
        Err(Refusal::Stop(e)) => Err(e),
    }
}

/// Verifies `cp` and restores it. `explicit` (start --from) never moves or marks the checkpoint.
fn try_restore(ctx: &Job, cp: &Checkpoint, explicit: bool, progress: Progress) -> Result<Started, Refusal> {
    tracing::debug!("restore: verifying");
    let images = match crate::store::chain::is_layered(cp) {
        true => Images::Flattened(verify_chain(ctx, cp, explicit, progress)?),
        false if verify_before(ctx, cp, explicit, progress)? => Images::Served,
        false => Images::Read,
    };
    tracing::debug!("restore: verified");
    check_fits(ctx, cp, explicit)?;
    cp.clear_incompatible();
    tracing::debug!("restore: fits");
    let before = ctx
        .store
        .record_run(&format!("restored from checkpoint {}", cp.id))
        .map_err(|e| Refusal::Stop(StartError::from(e)))?;
    if cp.manifest.size_bytes >= crate::engine::progress::BIG {
        phase(progress, "restoring", cp.manifest.size_bytes);
    }
    restore(ctx, cp, images, progress).map_err(|e| {
        // The tree never ran (CRIU failed before the service did, or its images were refused):
        // the run did not happen.
        let _ = ctx.store.undo_run(&before);
        refusal(ctx, cp, explicit, e)
    })
}

/// How CRIU gets the images of a checkpoint that checked out.
enum Images {
    /// Served by criu::streamer, checked as CRIU reads them.
    Served,
    /// Read by CRIU from the checkpoint (or plain copies of its images), checked before.
    Read,
    /// An incremental checkpoint or a pre-copy stop: its chain written out as one full
    /// checkpoint for CRIU, every byte of it checked (store::chain).
    Flattened(crate::store::compress::PlainImages),
}

/// A layered checkpoint's chain checked and written out flat for CRIU (store::chain). A damaged
/// link is quarantined (unless the user named `cp`): when it is a parent, every checkpoint that
/// needs it is unrestorable, and the start goes on to an older one.
fn verify_chain(
    ctx: &Job,
    cp: &Checkpoint,
    explicit: bool,
    progress: Progress,
) -> Result<crate::store::compress::PlainImages, Refusal> {
    if cp.manifest.size_bytes >= crate::engine::progress::BIG {
        phase(progress, "flattening", cp.manifest.size_bytes);
    }
    let e = match crate::store::chain::flatten_verified(&ctx.store, cp) {
        Ok(flat) => return Ok(flat),
        Err(e) => e,
    };
    let reason = format!("checkpoint {} failed verification before restore: {e}", cp.id);
    Err(Refusal::Skip(match e.damaged_link() {
        Some(id) if id == cp.id => quarantine(ctx, &cp.id, &reason, explicit),
        Some(parent) => {
            let why = format!("checkpoint {parent} failed verification (the parent of checkpoint {}): {e}", cp.id);
            let moved = quarantine(ctx, parent, &why, explicit);
            format!("checkpoint {} cannot be restored without its parent: {moved}", cp.id)
        }
        None => format!("checkpoint {} cannot be restored: {e}", cp.id),
    }))
}

/// What can be proved before CRIU runs: every image is there, nothing else, each of its size;
/// for a CRIU that cannot be served its images, their content too. Ok: whether CRIU is served
/// them (and checks them as it reads).
fn verify_before(ctx: &Job, cp: &Checkpoint, explicit: bool, progress: Progress) -> Result<bool, Refusal> {
    let Some(images) = &cp.manifest.images else {
        // Format 1 recorded no checksums: nothing proves these are the bytes that were dumped.
        return Err(Refusal::Skip(format!(
            "checkpoint {} has no image checksums (manifest format {}, from a stasis before format 2), so it cannot be verified; it is kept in {}",
            cp.id,
            cp.manifest.format,
            cp.dir.display()
        )));
    };
    // A small plain checkpoint is read whole before CRIU runs, while the criu warmed up for the
    // restore still probes the kernel: that costs the start nothing, and CRIU then reads its
    // images from the disk at full speed (config::host::RestoreDefault::verify_first_below).
    let plain = cp.manifest.compression.is_none() && cp.manifest.encryption.is_none();
    let small = plain && cp.manifest.size_bytes < ctx.host.restore.verify_first_below;
    let stream = !small && streams(ctx);
    // Every file there, nothing else, each of its size: no content is read for that.
    let listed = verify::check_listing(&cp.dir, images);
    let checked = match (listed, stream) {
        (Err(problem), _) => Err(problem),
        // The content as CRIU reads it.
        (Ok(()), true) => Ok(()),
        // A small checkpoint, or a CRIU that cannot be served its images: all of them read first.
        (Ok(()), false) => {
            if cp.manifest.size_bytes >= crate::engine::progress::BIG {
                phase(progress, "verifying", cp.manifest.size_bytes);
            }
            verify::verify_images(&cp.dir, images)
        }
    };
    if let Err(problem) = checked {
        let reason = format!("checkpoint {} failed verification before restore: {problem}", cp.id);
        return Err(Refusal::Skip(quarantine(ctx, &cp.id, &reason, explicit)));
    }
    Ok(stream)
}

/// Refuses a checkpoint of a program that changed on disk since (and marks it, unless explicit).
fn check_fits(ctx: &Job, cp: &Checkpoint, explicit: bool) -> Result<(), Refusal> {
    let Err(m) = fits_program(ctx, cp) else {
        return Ok(());
    };
    let reason = format!(
        "checkpoint {} does not fit the program on disk: {} changed ({}); restoring it would run old memory on new code",
        cp.id,
        m.path.display(),
        m.detail
    );
    if explicit {
        return Err(Refusal::Skip(format!("{reason}; it is kept")));
    }
    let _ = cp.mark_incompatible(&reason);
    if ctx.service.on_incompatible == OnIncompatible::Fail {
        return Err(Refusal::Stop(StartError::Incompatible { reason, file: ctx.service.file.clone() }));
    }
    Err(Refusal::Skip(format!("{reason}; kept it, marked incompatible")))
}

/// What a failed restore of `cp` means for the start: try the next checkpoint, or stop.
fn refusal(ctx: &Job, cp: &Checkpoint, explicit: bool, e: RestoreError) -> Refusal {
    let still = if explicit { "restorable" } else { "fresh" };
    match e {
        RestoreError::Damaged(problem) => {
            let reason = format!(
                "checkpoint {} failed verification during the restore: {problem}; the restored processes were killed before they ran",
                cp.id
            );
            Refusal::Skip(quarantine(ctx, &cp.id, &reason, explicit))
        }
        RestoreError::Criu(e) => {
            let (one_line, details) = (e.one_line(), e_lines(&e));
            match e.restore_failure() {
                RestoreFailure::Environment(why) => {
                    Refusal::Stop(StartError::Environment { id: cp.id.clone(), why, criu: one_line, still, details })
                }
                RestoreFailure::Checkpoint => {
                    let reason = format!("restore of checkpoint {} failed: {one_line}", cp.id);
                    Refusal::Skip(quarantine(ctx, &cp.id, &format!("{reason}{details}"), explicit))
                }
            }
        }
        RestoreError::Host(why) => Refusal::Stop(StartError::Host { id: cp.id.clone(), why, still }),
        RestoreError::Refused(why) => {
            Refusal::Stop(StartError::FileChanged { id: cp.id.clone(), why, still, service: ctx.service.name.clone() })
        }
        RestoreError::Other(why) => Refusal::Skip(format!("restore of checkpoint {} failed: {why}", cp.id)),
    }
}

fn e_lines(e: &crate::criu::CriuError) -> String {
    match e {
        crate::criu::CriuError::Failed { errors, .. } if !errors.is_empty() => format!("\n{}", errors.join("\n")),
        _ => String::new(),
    }
}

/// Moves a damaged checkpoint aside (unless the user named it) and returns the reason to report.
fn quarantine(ctx: &Job, id: &str, reason: &str, explicit: bool) -> String {
    let (summary, _) = reason.split_once('\n').unwrap_or((reason, ""));
    if explicit {
        return format!("{summary}; it was left in place");
    }
    match ctx.store.quarantine(id, reason) {
        Ok(moved) => {
            // It will never be restored, so nothing will remove its network lock otherwise.
            let _ = crate::criu::network_lock::end(
                &ctx.dirs.state_dir,
                &moved,
                crate::criu::network_lock::LockEnd::NeverRestored,
            );
            format!("{summary}; quarantined it in {}", moved.display())
        }
        Err(e) => format!("{summary}; failed to quarantine it: {e}"),
    }
}

/// Whether every executable the checkpoint maps is still the same file content. The current
/// build's init copy was verified (and repaired if damaged) before this runs.
fn fits_program(ctx: &Job, cp: &Checkpoint) -> Result<(), identity::Mismatch> {
    let mut cache = ctx.hash_cache();
    let result = match &cp.manifest.executables {
        Some(recorded) => {
            identity::compare(recorded, &mut cache, Some(std::time::Instant::now() + ctx.service.restore_timeout))
        }
        // Format 1: only the init binary's presence is known to matter.
        None if !cp.manifest.init_binary.is_file() => Err(identity::Mismatch {
            path: cp.manifest.init_binary.clone(),
            detail: "the namespace init it was taken with is missing".into(),
        }),
        None => Ok(()),
    };
    cache.save();
    result
}

/// Whether this CRIU can be served the images (criu::streamer); said once per supervisor when not.
fn streams(ctx: &Job) -> bool {
    let cache = ctx.dirs.criu_version_cache().with_file_name("criu-streams.json");
    let yes = ctx.criu.streams_restores(&cache);
    if !yes {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::warn!(
                "{} cannot be served images over RPC (CRIU without scripts/criu-patches/0003-rpc-image-streamer.patch): images are verified in a pass of their own before each restore",
                ctx.criu.path.display()
            )
        });
    }
    yes
}

fn restore(ctx: &Job, cp: &Checkpoint, images: Images, progress: Progress) -> Result<Started, RestoreError> {
    let mut lazy = match images {
        // The lazy-pages daemon reads one directory of its own: not a chain.
        Images::Flattened(_) => None,
        _ => lazy_start(ctx, cp)?,
    };
    let (mut streamer, plain) = match (&lazy, images) {
        (Some(_), _) => (None, None),
        (None, Images::Flattened(flat)) => (None, Some(flat)),
        (None, images) => image_source(ctx, cp, matches!(images, Images::Served), progress)?,
    };
    // stasis's own files (what a reboot removed, files the service writes, shared memory), which
    // are read before CRIU runs: checked first (and decrypted into RAM when sealed).
    let mut own = match &mut streamer {
        Some(s) => s.own_files(&cp.images_dir()).map_err(|e| match e {
            OwnFilesError::Damaged(problem) => RestoreError::Damaged(problem),
            OwnFilesError::Host(why) => RestoreError::Host(why),
        })?,
        None => plain.as_ref().map_or_else(|| cp.images_dir(), |p| p.dir.clone()),
    };
    let mut args = restore_args(ctx, cp, &streamer, &plain);
    if let Some(l) = &lazy {
        (own, args.images_dir, args.lazy_pages) = (l.dir().to_path_buf(), l.dir().to_path_buf(), true);
    }
    let mut shm_notes = put_back_shm(cp, &own)?;
    shm_notes.extend(put_back_files(ctx, cp, &own)?);
    let slot = restore_slot(ctx, progress)?;
    let restore_started = std::time::Instant::now();
    let (output, stdout_w, warm) = stdout_pipe(ctx)?;
    tracing::debug!("restore: running criu");
    let outcome = run_criu(ctx, cp, &args, &streamer, &mut lazy, &stdout_w, warm, progress);
    let served = streamer.map(Streamer::finish);
    if let Some(problem) = served.as_ref().and_then(|o| o.problem.clone()) {
        // Damage wins over whatever CRIU made of the pipe it closed. A tree that exists despite
        // the refusal (it cannot: see criu::requests) is ended all the same.
        if let Ok(pid) = &outcome {
            crate::process::tree::kill_if_child_of(*pid, std::process::id() as i32, libc::SIGKILL);
        }
        return Err(RestoreError::Damaged(problem));
    }
    if let Some(e) = lazy.as_mut().filter(|_| outcome.is_err()).and_then(lazy_start::failed_during) {
        return Err(e);
    }
    let restored = outcome.map_err(RestoreError::Criu)?;
    let restore_ms = restore_started.elapsed().as_millis() as u64;
    tracing::debug!("restore: criu done");
    drop(slot);
    drop(stdout_w);
    let pid = our_child(restored)?;
    let notes = restore_notes(ctx, cp, shm_notes, served.as_ref());
    // A restore that succeeded has removed the dump's network lock.
    let _ =
        crate::criu::network_lock::end(&ctx.dirs.state_dir, &cp.dir, crate::criu::network_lock::LockEnd::RemovedByCriu);
    let _ = cp.clone().record_timings(|t| t.restore_ms = Some(restore_ms));
    let started = Started {
        info: StartInfo {
            init_pid: pid,
            started_from: StartedFrom::Checkpoint,
            checkpoint: Some(cp.id.clone()),
            fallback_reason: None,
            notes,
            restore_ms: Some(restore_ms),
            began: std::time::Instant::now(),
        },
        output,
        notify: None,
    };
    if let Some(l) = lazy {
        lazy_start::watch(l, &started);
    }
    Ok(started)
}

/// `restore: lazy`: the daemon and its plain images, before CRIU runs (criu::lazy).
fn lazy_start(ctx: &Job, cp: &Checkpoint) -> Result<Option<crate::criu::lazy::LazyPages>, RestoreError> {
    if !lazy_start::wanted(ctx, cp) {
        return Ok(None);
    }
    let key = match &cp.manifest.encryption {
        Some(e) => Some(checkpoint_key(ctx, &e.key_id).map_err(|e| RestoreError::Host(e.to_string()))?),
        None => None,
    };
    lazy_start::set_up(ctx, cp, key.as_ref()).map(Some)
}

/// Served to CRIU, checked as it reads them; or, for a CRIU that cannot be, written out plain
/// for it first when compressed or sealed.
fn image_source(
    ctx: &Job,
    cp: &Checkpoint,
    stream: bool,
    progress: Progress,
) -> Result<(Option<Streamer>, Option<PlainImages>), RestoreError> {
    let key = match &cp.manifest.encryption {
        Some(e) => Some(checkpoint_key(ctx, &e.key_id).map_err(|e| RestoreError::Host(e.to_string()))?),
        None => None,
    };
    if stream {
        let s = Streamer::start(cp, key)
            .map_err(|e| RestoreError::Host(format!("failed to set up serving its images to CRIU: {e}")))?;
        return Ok((Some(s), None));
    }
    let plain = match (&cp.manifest.compression, &key) {
        (None, None) => None,
        (_, key) => {
            phase(progress, if key.is_some() { "decrypting" } else { "decompressing" }, cp.manifest.size_bytes);
            Some(
                PlainImages::new(&cp.dir, &cp.images_dir(), key.as_ref())
                    .map_err(|e| RestoreError::Host(format!("failed to decrypt or decompress its images: {e}")))?,
            )
        }
    };
    Ok((None, plain))
}

fn restore_args(ctx: &Job, cp: &Checkpoint, streamer: &Option<Streamer>, plain: &Option<PlainImages>) -> RestoreArgs {
    RestoreArgs {
        images_dir: match (streamer, plain) {
            (Some(s), _) => s.dir().to_path_buf(),
            (None, Some(p)) => p.dir.clone(),
            (None, None) => cp.images_dir(),
        },
        work_dir: cp.dir.clone(),
        config_file: ctx.service.criu_config.clone(),
        options: ctx.service.criu_options.clone(),
        stdout_pipe_inode: cp.manifest.stdout_pipe_inode,
        streamed_from: streamer.as_ref().map(|s| s.dir_fd()),
        lazy_pages: false,
    }
}

/// POSIX shared memory: back from the (verified) copy in `own` when a reboot emptied /dev/shm,
/// or CRIU cannot reopen it. A failure here is this host's (a full /dev/shm), not the checkpoint's.
fn put_back_shm(cp: &Checkpoint, own: &std::path::Path) -> Result<Vec<String>, RestoreError> {
    use crate::store::shm::{Present, PutBack};
    let Some(files) = &cp.manifest.shm_files else {
        return Ok(Vec::new());
    };
    let present = if cp.manifest.kind.leaves_running() { Present::Rewind } else { Present::Keep };
    let put = crate::store::shm::put_back(files, own, present)
        .map_err(|e| RestoreError::Host(format!("failed to put back the service's shared memory files: {e}")))?;
    Ok(put
        .into_iter()
        .map(|done| match done {
            PutBack::Created(p) => {
                format!("{} was missing (a reboot empties /dev/shm); put back from the checkpoint", p.display())
            }
            PutBack::Rewound(p) => {
                format!("{} rewound to its contents at the checkpoint (the service ran on after it)", p.display())
            }
        })
        .collect())
}

fn restore_slot(ctx: &Job, progress: Progress) -> Result<slots::Slot, RestoreError> {
    let max = ctx.host.max_concurrent_restores;
    slots::acquire(&ctx.dirs.slots(), SlotKind::Restore, max, |ahead| {
        progress(StartProgress::Queued(format!(
            "waiting for a restore slot: {ahead} ahead (max_concurrent_restores: {max})"
        )))
    })
    .map_err(|e| RestoreError::Other(format!("failed to take a restore slot in {}: {e}", ctx.dirs.slots().display())))
}

/// The service's new stdout (read end, write end), and the criu the supervisor warmed up for
/// this restore (criu::standby), which holds the write end already; else a new pipe.
fn stdout_pipe(ctx: &Job) -> Result<(OwnedFd, OwnedFd, Option<crate::criu::rpc::Swrk>), RestoreError> {
    use crate::criu::standby::{Ends, Purpose, Warm};
    match crate::criu::standby::take(&ctx.criu.path, Purpose::Restore) {
        Some(Warm { swrk, ends: Ends::Restore { output, stdout } }) => Ok((output, stdout, Some(swrk))),
        _ => {
            let (output, stdout) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| RestoreError::Other(format!("failed to create a pipe: {e}")))?;
            Ok((output, stdout, None))
        }
    }
}

/// Runs CRIU's restore, its progress watched; returns the restored root's pid.
fn run_criu(
    ctx: &Job,
    cp: &Checkpoint,
    args: &RestoreArgs,
    streamer: &Option<Streamer>,
    lazy: &mut Option<crate::criu::lazy::LazyPages>,
    stdout_w: &OwnedFd,
    warm: Option<crate::criu::rpc::Swrk>,
    progress: Progress,
) -> Result<i32, crate::criu::CriuError> {
    let criu_pid = std::sync::OnceLock::new();
    // The gate: the tree resumes only if every byte CRIU was given checked out, and every image
    // it did not ask for too.
    let mut gate = |n: &Notification| match (streamer, n.script.as_str()) {
        (Some(s), "post-restore" | "pre-resume") => match s.check() {
            Ok(()) => Answer::Proceed,
            Err(problem) => Answer::Refuse(format!("checkpoint {} failed verification: {problem}", cp.id)),
        },
        _ => lazy_start::at_notification(lazy, n),
    };
    std::thread::scope(|s| {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let total = cp.manifest.size_bytes;
        let pid = &criu_pid;
        let line = |l: String| progress(StartProgress::Line(l));
        s.spawn(move || crate::engine::progress::watch_restore(pid, total, &line, done_rx));
        let r = ctx.criu.restore(
            args,
            Some(stdout_w.as_fd()),
            ctx.service.restore_timeout,
            &|pid| {
                let _ = criu_pid.set(pid);
            },
            &mut gate,
            warm,
        );
        drop(done_tx);
        r.map(|o| o.pid)
    })
}

/// The restored root must be our child (we are its subreaper), or we could not supervise it.
fn our_child(restored: i32) -> Result<Pid, RestoreError> {
    let pid = Pid::from_raw(restored);
    let parent = procfs::process::Process::new(restored).ok().and_then(|p| p.stat().ok()).map(|s| s.ppid);
    if parent != Some(std::process::id() as i32) {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        return Err(RestoreError::Other(format!(
            "the restored process {restored} is not a child of the supervisor (parent {parent:?})"
        )));
    }
    Ok(pid)
}

fn restore_notes(
    ctx: &Job,
    cp: &Checkpoint,
    mut notes: Vec<String>,
    served: Option<&crate::criu::streamer::Outcome>,
) -> Vec<String> {
    if let Some(served) = served {
        tracing::debug!("restore: CRIU asked for {:?}", served.requested);
        notes.extend(served.notes.iter().cloned());
    }
    if cp.manifest.config_digest.as_deref().is_some_and(|d| d != ctx.service.digest()) {
        notes.push(format!(
            "{} changed since checkpoint {} was taken; the restored process keeps the command, user, directory and environment it had then (they apply at the next cold start)",
            ctx.service.file.display(),
            cp.id
        ));
    }
    notes
}

/// What a reboot removed comes back (the directories of the service's unix sockets, its small
/// files of /run), then each file the service writes is brought back to what the memory expects,
/// or the restore is refused naming the file (the checkpoint is kept either way).
fn put_back_files(ctx: &Job, cp: &Checkpoint, images: &std::path::Path) -> Result<Vec<String>, RestoreError> {
    let m = &cp.manifest;
    let (dirs, files) = (m.tmpfs_dirs.as_deref().unwrap_or_default(), m.tmpfs_files.as_deref().unwrap_or_default());
    let mut notes = crate::store::tmpfs::put_back(dirs, files, images)
        .map_err(|e| RestoreError::Host(format!("failed to put back what a reboot removes: {e}")))?;
    if let Some(written) = &m.written_files {
        let deadline = Some(std::time::Instant::now() + ctx.service.restore_timeout);
        let s = &ctx.service;
        let done = crate::store::written::reconcile(written, images, &cp.id, s.on_file_changed, &s.file, deadline)
            .map_err(|e| match e.is_refusal() {
                true => RestoreError::Refused(e.to_string()),
                false => RestoreError::Host(e.to_string()),
            })?;
        notes.extend(done);
    }
    for n in &notes {
        tracing::info!("{n}");
    }
    Ok(notes)
}

/// The service's key, which must be the one of id `key_id` the checkpoint was sealed with.
fn checkpoint_key(ctx: &Job, key_id: &str) -> Result<crate::store::seal::Key, crate::store::seal::KeyError> {
    crate::store::seal::Key::matching(ctx.service.encryption_key_file.as_deref(), key_id, &ctx.service.file)
}
