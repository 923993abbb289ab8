//! Pre-copy stops: where the kernel tracks dirty pages, a stop first runs one `criu pre-dump`
//! while the service keeps running (frozen only to collect its pages), which clears the
//! soft-dirty bits; the stopping dump that follows (`track_mem`, parent = the pre-dump) then
//! freezes the service only for the pages written since. The pre-dump's images go into the
//! checkpoint being written (`images/pre-dump/`, its pages through our page server, hashed as
//! they arrive) and are made durable before the freeze, so the checkpoint is complete by itself:
//! a restore reads the two layers (store::chain), and nothing outside it is pinned.
//!
//! A pre-dump that fails costs nothing but its time: its files are removed and the stop takes a
//! full dump, as without pre-copy.

use crate::criu::page_server::{Pages, Received};
use crate::criu::DumpArgs;
use crate::engine::Job;
use crate::store::chain::PRE_DUMP_DIR;
use crate::store::seal::Key;
use crate::store::PendingCheckpoint;
use std::collections::BTreeSet;
use std::time::Instant;

/// A pre-dump that is in the pending checkpoint, durable.
pub struct PreCopied {
    pub received: Received,
    /// Its pagemaps (`pagemap-1.img`): the only ones the stopping dump may leave pages in.
    pub pagemaps: BTreeSet<String>,
    pub took_ms: u64,
}

/// The manifest's name for the pre-dump's directory.
pub fn rel_dir() -> String {
    format!("{}/{PRE_DUMP_DIR}", crate::store::IMAGES_DIR)
}

/// Whether a stop of this service pre-copies (`stop_pre_copy`, and a kernel that tracks dirty
/// pages, and images that are not sealed).
pub fn wanted(ctx: &Job) -> bool {
    ctx.service.stop_pre_copy && super::incremental::tracking_possible(ctx)
}

/// Runs the pre-dump of the tree of `init_pid` into `pending`, within `dump_timeout` of its own.
/// None when it failed (logged; its files removed).
/// `progress` hears a line a second while it runs (`pre-copying`).
pub fn run(
    ctx: &Job,
    init_pid: i32,
    pending: &PendingCheckpoint,
    key: Option<&Key>,
    progress: &(impl Fn(super::DumpProgress) + Sync),
) -> Option<PreCopied> {
    let started = Instant::now();
    let dir = pending.images_dir().join(PRE_DUMP_DIR);
    if let Err(e) = crate::store::durable::create_dir_with_mode(&dir, 0o700) {
        tracing::warn!("pre-copy: failed to create {}: {e}; the stop takes a full dump", dir.display());
        return None;
    }
    let args = DumpArgs {
        pid: init_pid,
        images_dir: dir.clone(),
        work_dir: pending.dir.clone(),
        config_file: ctx.service.criu_config.clone(),
        options: ctx.service.criu_options.clone(),
        leave_running: true,
        track_mem: true,
        parent_img: None,
        pages: Pages { rel_dir: rel_dir(), parent: BTreeSet::new() },
    };
    // The pre-dump clears the soft-dirty bits whatever it comes to.
    super::incremental::forget(ctx);
    let transform = crate::store::stored::Transform { compression: ctx.service.compression, key };
    let outcome = std::thread::scope(|s| {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (images, log) = (dir.clone(), pending.dir.join(crate::criu::PRE_DUMP_LOG));
        let report = |line: String| progress(super::DumpProgress::Progress(line));
        s.spawn(move || crate::engine::progress::watch_dump(images, log, true, &report, done_rx));
        let r = ctx.criu.pre_dump(&args, &transform, ctx.service.dump_timeout, &|_| {});
        drop(done_tx);
        r
    });
    if let Err(crate::criu::CriuError::TimedOut { .. }) = &outcome {
        // A pre-dump killed at its deadline may have left the tree stopped: it runs again.
        super::resume(&ctx.dirs.state_dir, init_pid, &pending.dir, true);
    }
    let received = match outcome.map_err(|e| e.to_string()).and_then(|r| sync_dir(&dir).map(|()| r)) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("pre-copy: the pre-dump failed ({e}); the stop takes a full dump");
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
    };
    let pagemaps = received
        .images
        .iter()
        .filter_map(|s| s.file.path.rsplit('/').next())
        .filter(|n| n.starts_with("pagemap-"))
        .map(str::to_string)
        .collect();
    let took_ms = started.elapsed().as_millis() as u64;
    tracing::info!("pre-copy: pre-dumped {} pages in {took_ms} ms while the service ran", received.pages);
    Some(PreCopied { received, pagemaps, took_ms })
}

/// Every file of the pre-dump fsynced now, while the service runs: the finalize at the freeze
/// then finds nothing of it left to write.
fn sync_dir(dir: &std::path::Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("failed to read {}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let path = e.path();
        if path.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("failed to fsync {}: {e}", path.display()))?;
        }
    }
    Ok(())
}
