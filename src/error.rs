//! The top-level error of a command: wraps each module's error and maps it to an exit code.

use crate::exit_codes;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Criu(#[from] crate::criu::CriuError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Launch(#[from] crate::process::LaunchError),
    #[error(transparent)]
    Supervisor(#[from] crate::supervisor::SupervisorError),
    #[error("{service} is already running (supervisor pid {pid}); stop it first with `stasis stop {service}`")]
    AlreadyRunning { service: String, pid: String },
    #[error("an earlier run of {service} is still running without a supervisor (its supervisor died; namespace init pid {pid}); starting another copy could corrupt its state: stop it with `kill -TERM {pid}` (then -KILL if it stays), then start {service} again")]
    Orphaned { service: String, pid: i32 },
    #[error("{service} is not running; start it with `stasis start {service}`")]
    NotRunning { service: String },
    #[error("stasis must run as root (CRIU and the root-only state directory need it); try `sudo stasis ...`")]
    NotRoot,
    /// The caller may not do this to this service (the message says who may).
    #[error("failed to get permission: {0}")]
    NotAllowed(String),
    #[error("failed to {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    CheckpointFailed(String),
    #[error("{0}")]
    StartFailed(String),
    /// The checkpoint to restore cannot be proven right, and the settings say not to cold-start.
    #[error("{0}")]
    RestoreRefused(String),
    /// A request that cannot be carried out as given (the message says what to change).
    #[error("{0}")]
    Refused(String),
    /// `import` would not add the archive: the text says why; nothing was added.
    #[error("failed to import: {0}")]
    ImportRefused(String),
    /// The checkpoint to export is damaged or missing.
    #[error("failed to export: {0}")]
    ExportFailed(String),
}

impl Error {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { action, path: path.into(), source }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => exit_codes::CONFIG,
            Error::Criu(e) => e.exit_code(),
            Error::Store(e) => e.exit_code(),
            Error::Launch(_) => exit_codes::START_FAILED,
            Error::Supervisor(e) => e.exit_code(),
            Error::AlreadyRunning { .. } | Error::Orphaned { .. } => exit_codes::ALREADY_RUNNING,
            Error::NotRunning { .. } => exit_codes::NOT_RUNNING,
            Error::NotRoot | Error::NotAllowed(_) => exit_codes::ENVIRONMENT,
            Error::Io { .. } => exit_codes::INTERNAL,
            Error::CheckpointFailed(_) => exit_codes::CHECKPOINT_FAILED,
            Error::StartFailed(_) => exit_codes::START_FAILED,
            Error::RestoreRefused(_) => exit_codes::RESTORE_REFUSED,
            Error::Refused(_) => exit_codes::CONFIG,
            Error::ImportRefused(_) => exit_codes::IMPORT_REFUSED,
            Error::ExportFailed(_) => exit_codes::STORE,
        }
    }
}
