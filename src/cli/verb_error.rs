//! Why one of the daily verbs (`stop --no-checkpoint`, `restart`, `checkpoints --delete` and
//! `--prune`, `start --from ID --force` of a quarantined checkpoint) refused or failed, one
//! variant per step, each with the exit code it maps to.

use super::error::Error;
use super::exit_codes;
use crate::store::StoreError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VerbError {
    #[error(transparent)]
    Stasis(#[from] Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("failed to change the checkpoints of {service}: it is running (supervisor pid {pid}) and its supervisor may dump or restore one at any moment; stop it first (`stasis stop {service}`), then try again")]
    Running { service: String, pid: String },
    #[error("failed to lock {path}: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
    #[error("failed to find checkpoint {id} of {service} in {dir} or in its quarantine; `stasis checkpoints {service}` lists them")]
    NoSuchCheckpoint { service: String, id: String, dir: PathBuf },
    #[error("failed to delete checkpoint {id}: it is the only fresh checkpoint of {service} (the next `stasis start {service}` restores it, with the memory the service had when it stopped); pass --force to delete it anyway")]
    OnlyFresh { service: String, id: String },
    #[error("failed to delete checkpoint {id}: it is the last good checkpoint of {service}; pass --force to delete it anyway")]
    LastGood { service: String, id: String },
    #[error("failed to delete checkpoint {id}: it is the parent of checkpoint {child} of {service}, which holds only the pages written since it; delete {child} first (retention deletes a chain once a newer full checkpoint is kept)")]
    Parent { service: String, id: String, child: String },
    #[error("failed to restore checkpoint {id} of {service}: it is quarantined ({reason}); bring it back with `stasis start {service} --from {id} --force`, which verifies it first")]
    Quarantined { service: String, id: String, reason: String },
    #[error("failed to bring checkpoint {id} back from quarantine: {problem}; it stays quarantined in {dir}")]
    StillDamaged { id: String, problem: String, dir: PathBuf },
    #[error("failed to bring checkpoint {id} back from quarantine: it does not fit the program on disk: {path} changed ({detail}); it stays quarantined in {dir}; put the old file back and try again")]
    DoesNotFit { id: String, path: PathBuf, detail: String, dir: PathBuf },
    #[error("failed to reach the supervisor of {service} through {path}: {source}; see `stasis logs {service}`")]
    ControlSocket { service: String, path: PathBuf, source: std::io::Error },
    #[error("failed to stop {service} without a checkpoint: {why}")]
    StopFailed { service: String, why: String },
}

impl VerbError {
    pub fn exit_code(&self) -> i32 {
        match self {
            VerbError::Stasis(e) => exit_codes::of(e),
            VerbError::Store(_) => exit_codes::STORE,
            VerbError::Running { .. } => exit_codes::ALREADY_RUNNING,
            VerbError::Lock { .. } | VerbError::ControlSocket { .. } | VerbError::StopFailed { .. } => {
                exit_codes::INTERNAL
            }
            // A request that cannot be carried out as given, like `add` without --force.
            VerbError::NoSuchCheckpoint { .. }
            | VerbError::OnlyFresh { .. }
            | VerbError::LastGood { .. }
            | VerbError::Parent { .. } => exit_codes::CONFIG,
            VerbError::Quarantined { .. } | VerbError::StillDamaged { .. } | VerbError::DoesNotFit { .. } => {
                exit_codes::RESTORE_REFUSED
            }
        }
    }
}

/// Prints a verb's refusal the way every command prints its errors; other errors go up as they are.
pub fn report(result: Result<i32, VerbError>) -> Result<i32, Error> {
    match result {
        Ok(code) => Ok(code),
        Err(VerbError::Stasis(e)) => Err(e),
        Err(e) => {
            eprintln!("stasis: error: {}", crate::text::escape_lines(&e.to_string()));
            Ok(e.exit_code())
        }
    }
}
