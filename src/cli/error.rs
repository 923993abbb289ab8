//! The top-level error of a command: wraps each layer's error, the supervisor's for a start
//! (`exit_codes::of` maps it to an exit code), and adds the CLI's own.

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
    /// A start that failed, or was refused because the service runs: the supervisor's error.
    #[error(transparent)]
    Start(#[from] crate::supervisor::StartError),
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
}
