//! What a request to the event loop comes to, as types: a checkpoint (or why none was taken,
//! [`NotTaken`]), a stop without one ([`TerminateRefused`]), and why a wait to restart ended
//! ([`WaitEnded`]). The replies on the kill port and the control socket are built from these
//! (protocol::final_line), never read back from text.

use crate::engine::dump::{CheckpointReport, DumpError};
use std::sync::Arc;

/// The outcome of a request for a checkpoint, shared by everyone who waits on the same dump.
pub type Outcome = Result<CheckpointReport, NotTaken>;

/// Why a request for a checkpoint got none.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotTaken {
    /// The dump failed.
    #[error("{0}")]
    Dump(Arc<DumpError>),
    #[error("a checkpoint of {service} is already in progress; try again when it finishes")]
    InProgress { service: String },
    #[error("{service} is shutting down")]
    ShuttingDown { service: String },
    #[error("{service} is not running: it exited and was waiting to be restarted; it will not be")]
    WaitingToRestart { service: String },
    #[error("{service} exited before it could be stopped with a checkpoint")]
    ExitedBeforeStop { service: String },
    /// Asked while the supervisor finished, and the checkpoint was not taken.
    #[error("{service} is not running any more")]
    NotRunning { service: String },
    #[error("the supervisor is exiting")]
    SupervisorExiting,
    /// A dump that ended without sending its outcome (a bug).
    #[error("no outcome")]
    NoOutcome,
}

impl NotTaken {
    /// The verdict's text: the first line.
    pub fn summary(&self) -> String {
        match self {
            NotTaken::Dump(e) => e.headline(),
            other => other.to_string(),
        }
    }

    /// CRIU's error lines, which come before the verdict.
    pub fn details(&self) -> &[String] {
        match self {
            NotTaken::Dump(e) => e.criu_lines(),
            _ => &[],
        }
    }
}

impl From<DumpError> for NotTaken {
    fn from(e: DumpError) -> Self {
        NotTaken::Dump(Arc::new(e))
    }
}

/// Why a `stop --no-checkpoint` was not carried out that way.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TerminateRefused {
    /// The service ended on its own first (`how`).
    #[error("{service} exited by itself before it could be stopped: {how}")]
    ExitedFirst { service: String, how: String },
    #[error("the supervisor is exiting")]
    SupervisorExiting,
}

/// Why the supervisor ended while it waited to restart the service.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WaitEnded {
    /// A stop through the kill port or `stasis stop` (`why` is what the client was told).
    #[error("stopped while waiting to restart: {why}")]
    Stopped { why: NotTaken },
    #[error("stopped without a checkpoint while waiting to restart")]
    Terminated,
    #[error("stopped by SIGTERM while waiting to restart")]
    Sigterm,
    #[error("stopped by SIGINT while waiting to restart")]
    Sigint,
}
