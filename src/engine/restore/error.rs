//! Why a start got no service running ([`StartError`], one variant per way, each naming the
//! checkpoint or file involved and what is kept), and what a failed restore of one checkpoint
//! was ([`RestoreError`], the start's to judge: try the next one, or stop).

use crate::store::verify::ImageProblem;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Launch(#[from] crate::process::LaunchError),
    #[error("failed to create the socket for `ready: notify`: {0}")]
    NotifySocket(std::io::Error),
    /// A cold start that failed after a checkpoint was passed over: says both.
    #[error("{error}\n(it was a cold start because {because})")]
    ColdAfterFallback { error: Box<StartError>, because: String },
    /// `start --from ID` names no checkpoint of the service.
    #[error("failed to find checkpoint {id} of {service} in {}; `stasis checkpoints {service}` lists them", dir.display())]
    NotFound { id: String, service: String, dir: PathBuf },
    /// `start --from ID` names a checkpoint whose manifest cannot be read.
    #[error("failed to read checkpoint {id}: {why}")]
    Unreadable { id: String, why: String },
    /// `start --from ID`: the checkpoint cannot be proven right (`reason` says why).
    #[error("failed to restore the requested {reason}")]
    Requested { reason: String },
    /// The program changed on disk since, and `on_incompatible: fail` says not to cold-start.
    #[error("{reason}; kept it (marked incompatible) and did not start, because of `on_incompatible: fail` in {}; put the old file back, or set `on_incompatible: cold` to cold-start", file.display())]
    Incompatible { reason: String, file: PathBuf },
    /// CRIU failed for a reason of the host's (`why`), not the checkpoint's.
    #[error("failed to restore checkpoint {id} because {why}: {criu}; the checkpoint is kept (not quarantined, still {still}): fix that and start again{details}")]
    Environment { id: String, why: &'static str, criu: String, still: &'static str, details: String },
    /// Something of this host's (a full disk) failed the restore.
    #[error("failed to restore checkpoint {id}: {why}; the checkpoint is kept (not quarantined, still {still}): fix that and start again")]
    Host { id: String, why: String, still: &'static str },
    /// A file the service writes no longer matches the memory, and may not be put back.
    #[error("{why}\n(checkpoint {id} is kept, not quarantined, still {still}: `stasis start {service}` restores it once the file is fixed)")]
    FileChanged { id: String, why: String, still: &'static str, service: String },
}

impl StartError {
    /// Whether the start refused the checkpoint it had to restore (and did not cold-start),
    /// rather than failing to get anything running.
    pub fn refused_restore(&self) -> bool {
        matches!(
            self,
            StartError::NotFound { .. }
                | StartError::Unreadable { .. }
                | StartError::Requested { .. }
                | StartError::Incompatible { .. }
                | StartError::FileChanged { .. }
        )
    }
}

pub(super) enum RestoreError {
    Criu(crate::criu::CriuError),
    /// An image's bytes are not the ones in the manifest (found as they were read).
    Damaged(ImageProblem),
    /// Something of this host's (a full disk) and not of the checkpoint's.
    Host(String),
    /// A file the service writes no longer matches the memory, and may not be put back: the
    /// checkpoint is kept and the start fails (a cold start would rewrite the file).
    Refused(String),
    Other(String),
}
