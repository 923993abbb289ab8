//! `counters.json` of a service: how often it was restored, cold-started, checkpointed, and how
//! often that failed, for `stasis metrics`. Written atomically by the supervisor (one per service).

use super::durable::{write_atomic_with, Durability};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const COUNTERS_FILE: &str = "counters.json";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub restores: u64,
    pub cold_starts: u64,
    /// Starts that did not restore the newest checkpoint (it was stale, damaged, incompatible...).
    pub restore_fallbacks: u64,
    pub checkpoints: u64,
    pub checkpoint_failures: u64,
    /// Periodic checkpoints not taken because the disk had too little room (`min_free_bytes`).
    pub periodic_skipped: u64,
    /// Checkpoints whose freeze was longer than `max_freeze_ms`.
    pub freeze_over_budget: u64,
    /// Times the supervisor brought the service back after it exited (`restart:`).
    pub restarts: u64,
}

pub fn path(service_root: &Path) -> PathBuf {
    service_root.join(COUNTERS_FILE)
}

pub fn load(service_root: &Path) -> Counters {
    std::fs::read(path(service_root)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Applies `f` and saves; a failure only loses a count, so it is not reported.
pub fn bump(service_root: &Path, f: impl FnOnce(&mut Counters)) {
    let mut c = load(service_root);
    f(&mut c);
    // Figures for metrics: not worth an fsync on every start and stop.
    let _ =
        write_atomic_with(&path(service_root), &serde_json::to_vec(&c).expect("counters serialize"), Durability::None);
}
