//! The service's generation counter (`generation.json` in its state dir), written durably.
//!
//! Every checkpoint and every run (a restore or a cold start) takes the next number, so order
//! never depends on the clock. A checkpoint is *fresh* only if no run has a higher number than
//! it, i.e. the service has not run since it was taken; recording a run before the service
//! starts makes every existing checkpoint stale in one atomic write.

use super::durable::write_atomic;
use super::manifest::DumpKind;
use super::StoreError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const GENERATION_FILE: &str = "generation.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generations {
    /// The last number handed out.
    pub last: u64,
    /// The number taken by the latest run: every checkpoint below it is stale.
    pub last_run: u64,
    /// RFC 3339 time of that run.
    #[serde(default)]
    pub last_run_at: Option<String>,
    /// How it ran, in words ("restored from checkpoint X", "cold start").
    #[serde(default)]
    pub last_run_how: Option<String>,
}

/// Whether a checkpoint may be restored without `restore_stale`, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// The service ran after the checkpoint was taken (the text says how and when).
    Stale(String),
}

impl Generations {
    pub fn freshness(&self, generation: Option<u64>, kind: DumpKind) -> Freshness {
        if kind.leaves_running() {
            return Freshness::Stale(
                "it was taken while the service kept running, so the service ran on after it".into(),
            );
        }
        // Format 1 checkpoints have no number: only a store that never recorded a run can
        // vouch for them (an upgrade from a stasis without generations).
        let fresh = match generation {
            Some(g) => g > self.last_run,
            None => self.last_run == 0,
        };
        if fresh {
            Freshness::Fresh
        } else {
            let how = self.last_run_how.as_deref().unwrap_or("it ran");
            let at = self.last_run_at.as_deref().map(|t| format!(" at {t}")).unwrap_or_default();
            Freshness::Stale(format!("the service ran after it was taken ({how}{at})"))
        }
    }
}

pub struct GenerationFile {
    path: PathBuf,
}

impl GenerationFile {
    pub fn new(service_root: &Path) -> Self {
        GenerationFile { path: service_root.join(GENERATION_FILE) }
    }

    /// The current counters. A missing file is a new service (or one from before generations);
    /// a damaged one is rebuilt from `floor` (the highest generation on disk) with every
    /// checkpoint treated as stale, since nothing can prove otherwise.
    pub fn load(&self, floor: impl FnOnce() -> u64) -> Generations {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                let top = floor();
                Generations {
                    last: top,
                    last_run: top + 1,
                    last_run_at: None,
                    last_run_how: Some(format!(
                        "{} was damaged, so stasis cannot prove it did not",
                        self.path.display()
                    )),
                }
            }),
            Err(_) => Generations { last: floor(), ..Default::default() },
        }
    }

    pub fn save(&self, g: &Generations) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(g).expect("generations serialize");
        write_atomic(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_makes_earlier_stop_checkpoints_stale() {
        let mut g = Generations { last: 5, last_run: 3, ..Default::default() };
        assert_eq!(g.freshness(Some(5), DumpKind::Stop), Freshness::Fresh);
        assert!(matches!(g.freshness(Some(2), DumpKind::Stop), Freshness::Stale(_)));
        assert!(matches!(g.freshness(Some(5), DumpKind::KeepRunning), Freshness::Stale(_)));
        g.last_run = 6;
        assert!(matches!(g.freshness(Some(5), DumpKind::Stop), Freshness::Stale(_)));
    }

    #[test]
    fn format_1_checkpoints_are_fresh_only_before_the_first_recorded_run() {
        let g = Generations::default();
        assert_eq!(g.freshness(None, DumpKind::Stop), Freshness::Fresh);
        let g = Generations { last: 1, last_run: 1, ..Default::default() };
        assert!(matches!(g.freshness(None, DumpKind::Stop), Freshness::Stale(_)));
    }

    #[test]
    fn a_damaged_file_makes_everything_stale_and_keeps_counting_up() {
        let d = tempfile::tempdir().unwrap();
        let f = GenerationFile::new(d.path());
        std::fs::write(d.path().join(GENERATION_FILE), b"{garbage").unwrap();
        let g = f.load(|| 41);
        assert_eq!(g.last, 41);
        assert!(matches!(g.freshness(Some(41), DumpKind::Stop), Freshness::Stale(_)));
    }
}
