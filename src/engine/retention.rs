//! Retention, run after each new checkpoint and at start: the `keep_checkpoints` newest good
//! checkpoints stay; older ones go with their CRIU network-lock tables; quarantine keeps its
//! newest few; namespace-init copies that no checkpoint of any service needs and no process
//! runs are deleted. Nothing here ever touches the newest good checkpoint.

use crate::criu::network_lock::{self, LockEnd};
use crate::engine::Job;
use crate::process::init_binary;
use crate::store::CheckpointStore;
use std::time::Duration;

/// An init copy younger than this is kept even if unreferenced: another build's supervisor may
/// have just installed it and be about to exec it.
const INIT_COPY_MIN_AGE: Duration = Duration::from_secs(3600);

/// After a start every kept checkpoint is stale: nothing will restore it to carry on those
/// connections, so their network-lock tables only block the ports (and slow every dump on the
/// host). The restored checkpoint's own table CRIU has already removed.
pub fn release_stale_locks(ctx: &Job, restored: Option<&str>) {
    for c in ctx.store.list().unwrap_or_default().into_iter().filter(|c| Some(c.id.as_str()) != restored) {
        let _ = network_lock::end(&ctx.dirs.state_dir, &c.dir, LockEnd::NeverRestored);
    }
}

/// Applies retention; failures are logged and never fail the checkpoint that triggered it.
pub fn apply(ctx: &Job) -> Vec<String> {
    let mut notes = Vec::new();
    match ctx.store.beyond_retention(ctx.service.keep_checkpoints) {
        Ok(doomed) => {
            for c in doomed {
                // The table would otherwise hold the old checkpoint's connections for good.
                let _ = network_lock::end(&ctx.dirs.state_dir, &c.dir, LockEnd::NeverRestored);
                match ctx.store.remove(&c) {
                    Ok(()) => notes.push(format!(
                        "removed checkpoint {} (keep_checkpoints: {})",
                        c.id, ctx.service.keep_checkpoints
                    )),
                    Err(e) => notes.push(format!("failed to remove old checkpoint {}: {e}", c.id)),
                }
            }
        }
        Err(e) => notes.push(format!("failed to list checkpoints for retention: {e}")),
    }
    ctx.store.trim_quarantine();
    let mut keep = vec![ctx.init_binary.clone()];
    for name in ctx.dirs.services_with_state() {
        keep.extend(CheckpointStore::new(&ctx.dirs.service(&name)).referenced_init_binaries());
    }
    for p in init_binary::collect_garbage(&ctx.dirs.init_binaries(), &keep, INIT_COPY_MIN_AGE) {
        notes.push(format!("removed unused namespace init {}", p.display()));
    }
    for n in &notes {
        tracing::info!("{n}");
    }
    notes
}
